"""Raft for the KM enclaves: a sans-I/O core, durable log, asyncio driver and simulator."""
