"""Per-job contextualisation of stock cloud images (``context: cloud-init``): what goes into a job's
NoCloud seed (``cloudinit``: meta-data and user-data, pure) and the seed volume itself (``seed``: an
ISO9660 image labelled ``cidata``, made in Python). docs/images.md says what each seed carries."""

from blahvm.context.cloudinit import JobContext, meta_data, user_data
from blahvm.context.seed import SEED_LABEL, make_seed, read_seed, seed_files

__all__ = ["JobContext", "SEED_LABEL", "make_seed", "meta_data", "read_seed", "seed_files", "user_data"]
