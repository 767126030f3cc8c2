"""Forward-only (zeroth-order) training: seeded out-of-place perturbations and SPSA with seed replay."""

from qat.zo.perturb import Perturbation, derive_seed
from qat.zo.spsa import ZOSGD

__all__ = ["Perturbation", "ZOSGD", "derive_seed"]
