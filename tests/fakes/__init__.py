"""Discord's and Slack's servers, faked at the protocol level so discord.py, slack-bolt and slack_sdk run for real.

Each fake is an aiohttp server on a free loopback port that records every call it receives and can be told to
answer the next matching calls with a fault (429 with Retry-After, 5xx, 404).
"""
