"""The texts that ship with the machine: the out-of-domain licences, in their fixed order."""

import pytest

from qat.corpus import COMMON_LICENSES, LICENSES, licenses_text, shipped_text
from qat.errors import UserError


@pytest.mark.skipif(not COMMON_LICENSES.is_dir(), reason="not a Debian-based system")
def test_licenses_are_joined_in_their_fixed_order_and_share_nothing_with_the_training_text():
    text = licenses_text()
    starts = [text.index((COMMON_LICENSES / name).read_text(encoding="utf-8").strip("\n")) for name in LICENSES]
    assert starts == sorted(starts) and starts[0] == 0
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Apache License" in text
    topics = shipped_text()
    lines = {line.strip() for line in text.splitlines() if len(line.strip()) > 40 and any(c.isalpha() for c in line)}
    assert not [line for line in lines if line in topics]  # no long line of the licences is in the training corpus


def test_a_system_without_the_licences_gets_the_fix(tmp_path):
    (tmp_path / "GPL-3").write_text("only one")
    with pytest.raises(UserError, match="Apache-2.0.*eval.ood=PATH"):
        licenses_text(tmp_path)
