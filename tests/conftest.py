import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as fake_iemocap

REPO = Path(__file__).parent.parent

TINY_BACKBONE = [
    "backbone.pretrained=null",
    "backbone.random_init={hidden_size: 32, num_hidden_layers: 3, num_attention_heads: 2, "
    "intermediate_size: 64, conv_dim: 32}",
]


def small_config(folder: Path, *overrides: str):
    """configs/demo.yaml shrunk for tests: 2 sessions x 2 speakers x 4 emotions x 2 utts, tiny HuBERT."""
    from gmpatl_ray.config import load_config

    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.root={folder / 'corpus'}",
            f"data.manifest={folder / 'manifest.csv'}",
            "data.demo={sessions: 2, utterances_per_emotion: 2, dropped_per_speaker: 1}",
            f"experiment.output_dir={folder / 'out'}",
            f"experiment.cache_dir={folder / 'cache'}",
            *TINY_BACKBONE,
            "train.num_workers=1",  # start-up dominates tiny runs; DDP has tests of its own
            "train.cpus_per_worker=2",
            "gmp.layer=-2",
            "gmp.scales=[4, 8]",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (2 CPUs, as on the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The small demo corpus and its manifest, prepared once."""
    from gmpatl_ray.data.prepare import load_or_prepare

    folder = tmp_path_factory.mktemp("small")
    config = small_config(folder)
    return folder, load_or_prepare(config.data)
