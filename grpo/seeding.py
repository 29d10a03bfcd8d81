"""Where a run's randomness comes from: `policies.seeding`, re-exported here under its older path."""

from policies.seeding import (
    INIT_STREAM,
    PROCESS_STREAM,
    derived_seed,
    seed_process,
    seeded,
    use_deterministic_algorithms,
)

__all__ = [
    "INIT_STREAM",
    "PROCESS_STREAM",
    "derived_seed",
    "seed_process",
    "seeded",
    "use_deterministic_algorithms",
]
