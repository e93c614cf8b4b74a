"""skillgen: skill images on demand. The command line lives in skillgen.cli."""
