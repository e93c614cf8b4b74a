"""Fine-tuning: the trainer service, hostile-input ingestion, LoRA training and the adapter registry.

`bots.train_commands`, `skillgen.adapters.registry` and `trainer.ingest` never import torch, so the bots can parse
`/skill-train` and the consumer can resolve adapters without the training stack. Nothing is defined here: the
package also works as a namespace package, as `consumer` and `bots` are.
"""
