"""Importers of public operator profiles into agentservesim `operators` profiles.

- `import_llmservingsim(dir, ...)`: an LLMServingSim profile folder
  (profiler/perf/<HW>/<org>/<model>/<variant>/) -> profile dict;
- `import_vidur(dir, device, model, ...)`: a Vidur checkout's compute profile -> profile dict;
- `vidur_interconnect(dir, name)` / `fit_collective_curves(topology_dir)`: Vidur's network
  profiles -> fitted all-reduce and send/recv size->time curves (hardware/interconnects/*-fitted);
- `write_profile(profile, path)`: the YAML plus its CSV tables beside it.

`python -m calibrate.importers.build_reference_profiles` rebuilds every shipped profile from
../shared/reference; see docs/gpu-profiles.md.
"""

from .common import write_profile  # noqa: F401
from .llmservingsim import import_llmservingsim  # noqa: F401
from .vidur import fit_collective_curves, import_vidur, vidur_interconnect  # noqa: F401
