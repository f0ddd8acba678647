"""The evaluate stage on a CUDA GPU with a random-weight model of the real 1.5B shape.

    pytest -m gpu    # R1_RANDOM_MODEL=DIR: use that model (e.g. the real one) instead of building one
"""


import pandas as pd
import pytest
import torch

from stages import evaluate
from tests import random_model
from tests.conftest import set_params
from tests.dvc_stages import stage_args
from tests.test_evaluate import make_adapter, project  # noqa: F401  (project: the CPU tests' fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def tiny_model_dir(tmp_path_factory):  # the evaluate project fixture, pointed at the 1.5B-shaped model
    return str(random_model.for_tests(tmp_path_factory))


@pytest.fixture
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


def test_evaluate_runs_end_to_end_on_the_gpu_with_a_static_cache(project):  # noqa: F811
    set_params(project, "eval", limit=8, max_new_tokens=32, batch_size=8, static_cache=True)
    evaluate.main(stage_args("evaluate"))
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    finetuned_gsm8k = samples[(samples["model"] == "finetuned") & (samples["set"] == "gsm8k")]
    assert len(finetuned_gsm8k) == 6  # 3 problems x 2 samples
    assert samples["response_tokens"].max() <= 32
