"""MLflow metric keys of the analysis rows: every member set's key is one MLflow accepts."""
from __future__ import annotations

import pytest

from sweeps.driver import member_set_tag


@pytest.mark.parametrize("members,tag", [(None, ""), ("label-free", ""), ("all", "/all"),
                                         ("label-free (non-degenerate)", "/label-free_non-degenerate"),
                                         ("all (non-degenerate)", "/all_non-degenerate")])
def test_member_set_tags_are_valid_mlflow_keys(tmp_path, members, tag):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    assert member_set_tag({"members": members}) == tag
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("keys"))
    key = f"id_performance/SiteB{tag}_pearson_r"
    client.log_batch(run.info.run_id, metrics=[Metric(key, 0.5, 0, 0)])  # raises on a key MLflow refuses
    assert client.get_run(run.info.run_id).data.metrics[key] == 0.5
