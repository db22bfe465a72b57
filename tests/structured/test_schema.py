from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.schema import OutputSchema
from tests.structured.conftest import REVIEW_DICT, Review


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    count: int


def test_a_pydantic_model_gives_its_name_schema_and_class() -> None:
    schema = OutputSchema.of(Review)
    assert (schema.name, schema.model) == ("Review", Review)
    assert schema.json_schema == Review.model_json_schema()
    # pydantic leaves objects open unless extra="forbid": not strict-mode material.
    assert schema.strict is False
    assert OutputSchema.of(Closed).strict is True


@pytest.mark.parametrize(
    ("title", "name"),
    [("review", "review"), ("My review: v2!", "My_review_v2"), (None, "output"), ("x" * 80, "x" * 64)],
)
def test_a_dict_schema_is_named_after_its_title(title: str | None, name: str) -> None:
    value = {**REVIEW_DICT, "title": title} if title is not None else {"type": "object"}
    schema = OutputSchema.of(value)
    assert schema.name == name
    assert schema.model is None


def test_a_dict_schema_is_copied_and_strict_when_closed() -> None:
    given = json.loads(json.dumps(REVIEW_DICT))
    schema = OutputSchema.of(given)
    given["required"] = []
    assert schema.json_schema["required"] == ["label", "score"]
    assert schema.strict is True
    assert OutputSchema.of({"type": "object", "properties": {"a": {"type": "string"}}}).strict is False


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (42, "got int"),
        ("Review", "got str"),
        (dict, "got dict"),
        ({"type": "no-such-type"}, "not a valid JSON Schema at type"),
    ],
)
def test_anything_else_is_refused_naming_what_was_given(value: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        OutputSchema.of(value)


@pytest.mark.parametrize("schema", [Review, REVIEW_DICT], ids=["pydantic", "dict"])
@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"label": "positive", "score": 4, "topics": ["fit"]}', None),
        ('```json\n{"label": "negative", "score": 1, "topics": []}\n```', None),
        ("Sorry, I can only answer in prose.", "the answer is not JSON: Expecting value at line 1 column 1"),
        ('{"label": "positive"}', "score"),
        ('{"label": "meh", "score": 3, "topics": []}', "label"),
    ],
)
def test_parse_decodes_then_validates(schema: Any, text: str, error: str | None) -> None:
    if schema is REVIEW_DICT:  # a closed schema without topics
        text = text.replace(', "topics": ["fit"]', "").replace(', "topics": []', "")
    value, problem = OutputSchema.of(schema).parse(text)
    if error is None:
        assert problem is None
        assert value["label"] in ("positive", "negative")
    else:
        assert value is None
        assert problem is not None
        assert error in problem


def test_pydantic_values_come_back_ready_for_json() -> None:
    value, problem = OutputSchema.of(Review).parse('{"label": "mixed", "score": 3, "topics": ["a"]}')
    assert problem is None
    assert value == {"label": "mixed", "score": 3.0, "topics": ["a"]}
    assert isinstance(value["score"], float)


def test_errors_are_short_and_do_not_echo_the_answer() -> None:
    secret = "sk-" + "A" * 500
    _, problem = OutputSchema.of(Review).parse(json.dumps({"label": secret, "score": 1, "topics": []}))
    assert problem is not None
    assert secret not in problem
    assert len(problem) <= 300
    _, problem = OutputSchema.of(REVIEW_DICT).parse(json.dumps({"label": "positive", "score": 9, "x": 1}))
    assert problem is not None
    assert len(problem) <= 300


def test_an_operator_keeps_the_model_class_and_the_dag_serialises(tmp_path: Any) -> None:
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator

    with DAG("so_serialise", schedule=None) as dag:
        op = CreateBatchOperator(task_id="create", requests=[], model="m", output_schema=Review)
    assert op.output_schema is Review
    assert "output_schema" not in op.template_fields
    back = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert back.task_dict["create"].task_id == "create"


def test_an_operator_refuses_a_wrong_schema_when_the_dag_is_parsed() -> None:
    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator

    with pytest.raises(InvalidInputError, match="output_schema"):
        CreateBatchOperator(task_id="create", requests=[], model="m", output_schema=["label"])


@pytest.mark.parametrize("schema", [Review, REVIEW_DICT], ids=["pydantic", "dict"])
@pytest.mark.parametrize(
    "text",
    [
        '\ufeff{"label": "positive", "score": 4}',
        ' \ufeff```json\n{"label": "positive", "score": 4}\n```\n',
    ],
    ids=["bom", "bom-fence"],
)
def test_a_byte_order_mark_before_the_answer_is_dropped(schema: Any, text: str) -> None:
    if schema is Review:
        text = text.replace("4}", '4, "topics": []}', 1)
    value, problem = OutputSchema.of(schema).parse(text)
    assert problem is None
    assert value["label"] == "positive"


def test_a_pydantic_output_has_the_keys_of_the_schema_sent() -> None:
    class Aliased(BaseModel):
        label: str = Field(alias="Label")

    schema = OutputSchema.of(Aliased)
    assert list(schema.json_schema["properties"]) == ["Label"]
    assert schema.parse('{"Label": "x"}') == ({"Label": "x"}, None)
