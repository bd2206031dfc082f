"""The one-line error helpers every process boundary uses (launch ranks, Ray actors, loaders)."""

from sera_cli.data.errors import InputError, described, first_line


def test_first_line_skips_blank_lines_and_falls_back_to_the_type():
    assert first_line(ValueError("\n  \n  bad row 5  \nmore detail")) == "bad row 5"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   ")) == "RuntimeError"


def test_described_keeps_domain_messages_and_names_unexpected_failures():
    assert described(InputError("pairs.parquet", "row 5: chosen is empty")) == str(
        InputError("pairs.parquet", "row 5: chosen is empty"))
    assert described(ZeroDivisionError("division by zero\ntraceback...")) == "ZeroDivisionError: division by zero"
    assert described(MemoryError()) == "MemoryError"
