"""The flag machinery: ms-swift spelling, true/false booleans, one-line errors, YAML configs."""

from dataclasses import dataclass, field

import pytest

from keel.core.errors import KeelError
from keel.core.flags import build_parser, field_docs, parse_flags


@dataclass
class DemoArgs:
    max_new_tokens: int = 16
    """The most tokens to write."""
    stream: bool = False
    """Stream the answer."""
    dataset: list[str] = field(default_factory=list)
    """Dataset specs."""
    train_type: str = "lora"
    """Tuner type."""
    config: str | None = None
    """YAML file of the same keys."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise KeelError("--max_new_tokens must be >= 1")


def parse(*argv):
    return parse_flags(list(argv), [DemoArgs], prog="keel demo").configs[0]


def test_ms_swift_spelling_and_dashed_alias():
    assert parse("--max_new_tokens", "64").max_new_tokens == 64
    assert parse("--max-new-tokens", "65").max_new_tokens == 65


@pytest.mark.parametrize("text,value", [("true", True), ("false", False), ("True", True), ("0", False)])
def test_booleans_take_true_false(text, value):
    assert parse("--stream", text).stream is value


def test_bare_boolean_means_true():
    assert parse("--stream").stream is True


def test_list_flag_takes_several_values():
    assert parse("--dataset", "a.json#5", "b.json").dataset == ["a.json#5", "b.json"]


def test_unknown_flag_names_the_closest_valid_flag():
    with pytest.raises(KeelError, match=r"unknown flag --max_new_token\b.*did you mean --max_new_tokens"):
        parse("--max_new_token", "3")


def test_prefixes_are_not_silently_accepted():
    with pytest.raises(KeelError, match="unknown flag --max"):
        parse("--max", "3")


def test_bad_value_is_one_line_error():
    with pytest.raises(KeelError, match="max_new_tokens"):
        parse("--max_new_tokens", "many")
    with pytest.raises(KeelError, match="true or false"):
        parse("--stream", "maybe")


def test_post_init_validation_names_the_flag():
    with pytest.raises(KeelError, match="--max_new_tokens must be >= 1"):
        parse("--max_new_tokens", "0")


def test_help_text_comes_from_field_docstrings():
    assert field_docs(DemoArgs)["max_new_tokens"] == "The most tokens to write."
    help_text = build_parser([DemoArgs], "keel demo").format_help()
    assert "The most tokens to write." in help_text


def test_config_file_keys_with_command_line_winning(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_new_tokens: 7\nstream: true\ndataset: [x.json]\n")
    args = parse("--config", str(cfg), "--max_new_tokens", "9")
    assert (args.max_new_tokens, args.stream, args.dataset) == (9, True, ["x.json"])


def test_config_file_unknown_key_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_new_token: 7\n")
    with pytest.raises(KeelError, match="unknown key 'max_new_token'; did you mean max_new_tokens"):
        parse("--config", str(cfg))


def test_given_records_typed_flags_only():
    parsed = parse_flags(["--stream", "true"], [DemoArgs], prog="keel demo")
    assert parsed.given == {"stream"}
