"""The Prefect UI form is the deployments' parameter schema: it changes only on purpose.

tests/snapshots/parameter_schema.json was taken from the flows before the config sections moved
beside the code that reads them (the scoring flow's and the sweep flow's when they were added); a difference here is a
change to the form users see.
"""

import json
from pathlib import Path

from prefect.utilities.callables import parameter_schema

from pipelines.flow import retrying_train_flow
from pipelines.predict_flow import batch_predict_flow
from pipelines.remote import train_step_flow
from pipelines.sweep import sweep_flow

SNAPSHOT = Path(__file__).parent / "snapshots" / "parameter_schema.json"


def test_the_deployments_parameter_schema_matches_the_snapshot():
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    flows = (retrying_train_flow, train_step_flow, batch_predict_flow, sweep_flow)
    actual = {f.name: parameter_schema(f).model_dump_for_openapi() for f in flows}
    actual = json.loads(json.dumps(actual, sort_keys=True))
    assert set(actual) == set(expected)
    for name in expected:
        for key in ("properties", "required", "definitions"):
            assert actual[name].get(key) == expected[name].get(key), f"{name}: {key} differs from the snapshot"
        assert actual[name] == expected[name]
