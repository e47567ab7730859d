"""calibrate: profile a real vLLM engine and fit the simulator's step-time model.

`asim-calibrate run|profile|fit` (calibrate.cli). A profiling run (calibrate.profiling) starts
the engine, runs a designed grid of batches (calibrate.experiments) through its OpenAI
server (calibrate.runner), rebuilds each logged step's batch with our scheduler mirror
(calibrate.attribution), and the fit (calibrate.fit, calibrate.operators) writes a hardware
profile (calibrate.profile). calibrate.importers reads public profile formats.
See docs/calibration.md.
"""
