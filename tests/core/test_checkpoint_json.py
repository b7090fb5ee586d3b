"""Every JSON file l4compile reads from a checkpoint (config, tokenizer, generation, chat-template and preprocessor
files) goes through ``frontend.read_json_object``: a file that is not JSON, or JSON but not an object, is one
L4Error naming the file, never a traceback from ``.get`` on a list."""
from __future__ import annotations

import pytest

from l4compile import frontend
from l4compile.errors import L4Error
from l4compile.tokenizer import find_chat_template


@pytest.mark.parametrize("text,needle", [("[1, 2]", "is not a JSON object"), ("{", "cannot read"),
                                         (b"\xff\xfe", "cannot read")])
def test_every_checkpoint_json_reader_refuses_non_objects(tmp_path, text, needle):
    readers = {
        "tokenizer_config.json": lambda: frontend.image_tokens(tmp_path, None, 1000),
        "preprocessor_config.json": lambda: frontend.image_spec(tmp_path, None),
        "config.json": lambda: frontend.read_config(tmp_path),
    }
    for name, read in readers.items():
        f = tmp_path / name
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(L4Error, match=needle) as e:
            read()
        assert name in str(e.value) and "\n" not in str(e.value)
        f.unlink()
    (tmp_path / "chat_template.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(L4Error, match=needle):
        find_chat_template(tmp_path)
