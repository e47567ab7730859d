"""agentservesim's simulator: a discrete-event model of a vLLM v1 serving cluster running
multi-turn agent programs. A library: no CLI, no I/O beyond loading hardware profiles."""

__version__ = "0.1.0"
