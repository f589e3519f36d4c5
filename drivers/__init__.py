"""Instrument adapters: each turns a controller (or a file, or the simulator) into protocol messages."""
