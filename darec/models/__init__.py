"""Models: one two-stage model assembled from embeddings, a search and a head; presets name variants."""
from darec.models.config import ModelConfig, TABLE_LAYOUTS
from darec.models.presets import PRESETS, TABLE1_PRESETS, preset_config, register_preset
from darec.models.search import SEARCHES, Interest, register_search
from darec.models.two_stage import ModelOutput, TwoStageModel, build_model
from darec.models import clustering, hashing, ifa, split_search  # noqa: F401  (register ETA/SDIM/TWIN-V2/SIM/IFA)

__all__ = ["ModelConfig", "TABLE_LAYOUTS", "PRESETS", "TABLE1_PRESETS", "preset_config", "register_preset",
           "SEARCHES", "Interest", "register_search", "ModelOutput", "TwoStageModel", "build_model"]
