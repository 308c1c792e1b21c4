"""License gate, deterministic splits and their manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer import data
from kubetune_trainer.errors import UserError


def lic(name: str, usage: str = "commercial") -> api.LicenseSpec:
    return api.LicenseSpec.model_validate({"name": name, "usage": usage})


# ---- license


@pytest.mark.parametrize(
    "name",
    ["CC-BY-NC-4.0", "cc-by-nc-sa-4.0", "CC-BY-NC-ND-3.0", "research-only", "Non-Commercial"],
)
def test_non_commercial_license_refused_for_commercial_use(name: str) -> None:
    with pytest.raises(UserError) as error:
        data.check_license(lic(name), api.Policy())
    message = str(error.value)
    assert message.startswith("spec.dataset.license: ")
    assert name in message and "usage is commercial" in message


@pytest.mark.parametrize("name", ["CC-BY-NC-4.0", "research-only"])
@pytest.mark.parametrize("usage", ["research", "internal", "evaluation"])
def test_non_commercial_license_allowed_for_other_uses(name: str, usage: str) -> None:
    data.check_license(lic(name, usage), api.Policy())


@pytest.mark.parametrize(
    "name", ["CC-BY-4.0", "Apache-2.0", "MIT", "CC0-1.0", "ODC-BY", "SYNC-1.0"]
)
def test_commercial_licenses_pass(name: str) -> None:
    data.check_license(lic(name), api.Policy())


def test_allow_list_is_case_insensitive_and_refuses_others() -> None:
    policy = api.Policy(allowedLicenses=["Apache-2.0", "cc-by-4.0"])
    data.check_license(lic("CC-BY-4.0"), policy)
    data.check_license(lic("apache-2.0 "), policy)
    with pytest.raises(UserError) as error:
        data.check_license(lic("MIT"), policy)
    message = str(error.value)
    assert message.startswith("spec.dataset.license.name: license 'MIT' is not allowed")
    assert "allowed: Apache-2.0, cc-by-4.0" in message


def test_empty_allow_list_refuses_everything() -> None:
    with pytest.raises(UserError, match="allowed: none"):
        data.check_license(lic("MIT"), api.Policy(allowedLicenses=[]))


@pytest.mark.parametrize("name", ["unknown", "None", "N/A", "TBD"])
def test_placeholder_is_not_a_license(name: str) -> None:
    with pytest.raises(UserError, match=r"spec.dataset.license.name: .* is not a license"):
        data.check_license(lic(name, "research"), api.Policy())


# ---- split


def dataset(n: int, start: int = 0) -> data.Dataset:
    examples = [
        data.Example(f"row-{i}", i + 1, (("user", f"q{i}"), ("assistant", f"a{i}")))
        for i in range(start, start + n)
    ]
    return data.Dataset(examples, [], n, "0" * 64, "alpaca")


def split_spec(**fields: object) -> api.SplitSpec:
    return api.SplitSpec.model_validate(fields)


def assignment(splits: data.Splits) -> dict[str, str]:
    return {e.id: name for name, part in splits.items() for e in part}


def test_split_is_deterministic_and_close_to_the_fractions() -> None:
    spec = split_spec(validation=0.1, test=0.2, seed=7)
    first = data.split_dataset(dataset(2000), spec)
    second = data.split_dataset(dataset(2000), spec)
    assert assignment(first) == assignment(second) and first.hashes == second.hashes
    assert 150 <= len(first.validation) <= 250 and 330 <= len(first.test) <= 470
    assert len(first.train) + len(first.validation) + len(first.test) == 2000


def test_split_does_not_depend_on_row_order() -> None:
    spec = split_spec(seed=3)
    forward = dataset(300)
    backward = data.Dataset(forward.examples[::-1], [], 300, "0" * 64, "alpaca")
    assert assignment(data.split_dataset(forward, spec)) == assignment(
        data.split_dataset(backward, spec)
    )


def test_appending_rows_keeps_every_existing_row_in_its_split() -> None:
    spec = split_spec(validation=0.15, test=0.15, seed=11)
    before = assignment(data.split_dataset(dataset(500), spec))
    grown = dataset(500)
    grown.examples.extend(dataset(700, start=500).examples)
    after = assignment(data.split_dataset(grown, spec))
    assert {k: after[k] for k in before} == before
    assert len(after) == 1200


def test_seed_changes_the_split() -> None:
    a = assignment(data.split_dataset(dataset(300), split_spec(seed=1)))
    b = assignment(data.split_dataset(dataset(300), split_spec(seed=2)))
    assert a != b


def test_split_hashes_are_sha256_of_the_sorted_ids() -> None:
    splits = data.split_dataset(dataset(100), split_spec(seed=5))
    for name, part in splits.items():
        text = "".join(f"{i}\n" for i in sorted(e.id for e in part))
        assert splits.hashes[name] == hashlib.sha256(text.encode()).hexdigest()
    assert len(set(splits.hashes.values())) == 3


def test_zero_fractions_put_everything_in_train() -> None:
    splits = data.split_dataset(dataset(50), split_spec(validation=0.0, test=0.0))
    assert len(splits.train) == 50 and splits.validation == [] and splits.test == []


def test_explicit_sources_win_over_fractions_and_leave_train() -> None:
    main = dataset(200)
    validation = dataset(5, start=1000)
    # Rows 0-2 of the training file are also in the test file: they must not train.
    test = data.Dataset(
        main.examples[:3] + dataset(7, start=2000).examples, [], 10, "1" * 64, "alpaca"
    )
    splits = data.split_dataset(main, split_spec(validation=0.3, test=0.3), validation, test)
    assert splits.validation == validation.examples
    assert splits.test == test.examples
    assert len(splits.train) == 197 and splits.overlap == 3
    assert not {e.id for e in splits.train} & {e.id for e in test.examples}


def test_explicit_validation_keeps_the_test_fraction() -> None:
    splits = data.split_dataset(dataset(1000), split_spec(test=0.2), validation=dataset(4, 5000))
    assert len(splits.validation) == 4
    assert 140 <= len(splits.test) <= 260 and len(splits.train) == 1000 - len(splits.test)


def test_empty_train_is_a_user_error_naming_the_fields() -> None:
    # One row, and it lands in a held-out split for one of these seeds.
    for seed in range(50):
        try:
            data.split_dataset(dataset(1), split_spec(validation=0.45, test=0.44, seed=seed))
        except UserError as error:
            message = str(error)
            assert message.startswith("spec.dataset.split: no rows left for training")
            assert "spec.dataset.split.validation" in message
            return
    pytest.fail("no seed put the only row outside train")


def test_write_split_manifests(tmp_path: Path) -> None:
    splits = data.split_dataset(dataset(60), split_spec(seed=9))
    data.write_split_manifests(splits, tmp_path / "splits")
    hashes = json.loads((tmp_path / "splits" / "hashes.json").read_text())
    assert hashes == splits.hashes
    for name, part in splits.items():
        content = (tmp_path / "splits" / f"{name}.ids").read_bytes()
        assert content.decode().splitlines() == sorted(e.id for e in part)
        assert hashlib.sha256(content).hexdigest() == hashes[name]  # == `sha256sum <name>.ids`
