"""The simulator: synthetic STM surfaces and a simulated instrument that streams them."""
