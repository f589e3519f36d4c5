"""stm-live: a real-time acquisition loop beside a scanning tunnelling microscope."""

__version__ = "0.1.0"
