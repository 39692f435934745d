"""Files: variant choice, lookup in checkpoint folders, downloads against a local server, missing-file report."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import MissingFilesError
from host.files import CheckpointFolders, FileSpec, download_file, dtype_of, parse_entry, pick_variant, resolve_files
from host.hashes import HashCache

HF = "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/"
BASE_VARIANTS = [f"{HF}ZImageBase_bf16.safetensors", f"{HF}ZImageBase_quanto_bf16_int8.safetensors"]


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("ZImageBase_quanto_bf16_int8.safetensors", "int8"),
        ("ZImageBase_bf16.safetensors", "bf16"),
        ("Qwen3/qwen3_quanto_bf16_int8.safetensors", "int8"),
        ("model-fp16.safetensors", "fp16"),
        ("/data/Z-Image-Turbo", "unknown"),
    ],
)
def test_dtype_token_in_the_name_decides(name: str, dtype: str) -> None:
    assert dtype_of(name) == dtype


def test_variant_by_quantization() -> None:
    assert pick_variant(BASE_VARIANTS, "int8").endswith("_quanto_bf16_int8.safetensors")
    assert pick_variant(BASE_VARIANTS, "bf16").endswith("ZImageBase_bf16.safetensors")
    assert pick_variant(BASE_VARIANTS, "fp16").endswith("ZImageBase_bf16.safetensors")  # closest: bf16
    only_bf16 = [f"{HF}ZImageTurbo_VAE_bf16.safetensors"]
    assert pick_variant(only_bf16, "int8") == only_bf16[0]  # int8 where one exists, else bf16
    assert pick_variant(["/x/model.safetensors"], "int8") == "/x/model.safetensors"


def test_entries_parse_to_local_path_and_url() -> None:
    entry = parse_entry("text_encoder", f"{HF}Qwen3/qwen3_bf16.safetensors")
    assert (entry.relpath, entry.url, entry.name) == ("Qwen3/qwen3_bf16.safetensors", entry.entry, "qwen3_bf16.safetensors")
    assert parse_entry("t", "/abs/file.safetensors").absolute == Path("/abs/file.safetensors")
    assert parse_entry("t", "sub/file.safetensors").relpath == "sub/file.safetensors"


def test_wan2gp_short_hub_urls_download_from_revision_main() -> None:
    """Wan2GP's TwinFlow preset lists https://huggingface.co/<owner>/<repo>/<file> (no /resolve/main/); the VAE and
    other companions are found next to it the same way."""
    entry = parse_entry("transformer", "https://huggingface.co/DeepBeepMeep/Z-Image/TwinFlow-Z-Image-Turbo_bf16.safetensors")
    assert entry.relpath == "TwinFlow-Z-Image-Turbo_bf16.safetensors"
    assert entry.url == "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/TwinFlow-Z-Image-Turbo_bf16.safetensors"
    nested = parse_entry("text_encoder", "https://huggingface.co/DeepBeepMeep/Z-Image/Qwen3/qwen3_bf16.safetensors")
    assert (nested.relpath, nested.url) == ("Qwen3/qwen3_bf16.safetensors", f"{HF}Qwen3/qwen3_bf16.safetensors")
    blob = "https://huggingface.co/DeepBeepMeep/Z-Image/blob/main/x.safetensors"  # a page, not the short form
    assert parse_entry("t", blob).url == blob


def test_locate_in_primary_then_extra_folders_recursively(tmp_path: Path) -> None:
    primary, comfy, hf_cache = tmp_path / "ckpts", tmp_path / "ComfyUI" / "models", tmp_path / "hub"
    (primary / "Qwen3").mkdir(parents=True)
    (primary / "Qwen3" / "config.json").write_text("{}")
    weights = comfy / "diffusion_models" / "ZImageBase_bf16.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w")
    snapshot = hf_cache / "models--DeepBeepMeep--Z-Image" / "snapshots" / "abc" / "Qwen3"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_text("{}")
    (tmp_path / "elsewhere" / "tokenizer.json").parent.mkdir()
    (tmp_path / "elsewhere" / "tokenizer.json").write_text("{}")
    folders = CheckpointFolders(primary, [comfy, hf_cache, tmp_path / "elsewhere"])
    assert folders.locate("Qwen3/config.json") == primary / "Qwen3" / "config.json"
    assert folders.locate("ZImageBase_bf16.safetensors") == weights
    assert folders.locate("Qwen3/tokenizer.json") == snapshot / "tokenizer.json"  # parent folder must match
    assert folders.locate("Qwen3/vocab.json") is None


def test_missing_files_message_lists_name_url_and_target(tmp_path: Path) -> None:
    specs = [
        FileSpec("transformer", tuple(BASE_VARIANTS)),
        FileSpec("text_encoder", (f"{HF}Qwen3/qwen3_bf16.safetensors",)),
        FileSpec("lora", ("/nowhere/x.safetensors",)),
    ]
    with pytest.raises(MissingFilesError) as info:
        resolve_files(specs, "int8", CheckpointFolders(tmp_path / "ckpts"), download=None, model_type="z_image_base")
    message = str(info.value)
    assert "3 model file(s) missing for z_image_base" in message
    assert f"download: {HF}ZImageBase_quanto_bf16_int8.safetensors" in message
    assert f"put it at: {tmp_path / 'ckpts' / 'ZImageBase_quanto_bf16_int8.safetensors'}" in message
    assert f"put it at: {tmp_path / 'ckpts' / 'Qwen3' / 'qwen3_bf16.safetensors'}" in message
    assert "put it at: /nowhere/x.safetensors" in message
    assert "--checkpoints-dir" in message


# -- downloads against a local HTTP server (never huggingface.co) -------------------------------


class _Hub(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def _headers(self, body: bytes) -> None:
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        body = self.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self._headers(body)

    def do_GET(self) -> None:  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.do_HEAD()
            return
        start = int(self.headers.get("Range", "bytes=0-").split("=")[1].split("-")[0] or 0)
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self._headers(body[start:])
        self.wfile.write(body[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    _Hub.files = {
        "/DeepBeepMeep/Z-Image/resolve/main/Qwen3/config.json": b'{"hidden_size": 64}',
        "/plain/ZImageTurbo_VAE_bf16.safetensors": b"0123456789" * 10,
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_hub_url_into_ckpts_at_repo_path(tmp_path: Path, hub: str) -> None:
    specs = [FileSpec("text_encoder_config", (f"{hub}/DeepBeepMeep/Z-Image/resolve/main/Qwen3/config.json",))]
    files = resolve_files(specs, "int8", CheckpointFolders(tmp_path / "ckpts"), download=download_file)
    assert files["text_encoder_config"] == tmp_path / "ckpts" / "Qwen3" / "config.json"
    assert files["text_encoder_config"].read_bytes() == b'{"hidden_size": 64}'


def test_download_plain_url_resumes_a_partial_file(tmp_path: Path, hub: str) -> None:
    target = tmp_path / "ckpts" / "ZImageTurbo_VAE_bf16.safetensors"
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".incomplete").write_bytes(b"0123456789" * 4)  # an interrupted download
    entry = parse_entry("vae", f"{hub}/plain/ZImageTurbo_VAE_bf16.safetensors")
    assert download_file(entry, tmp_path / "ckpts") == target
    assert target.read_bytes() == b"0123456789" * 10
    assert not target.with_name(target.name + ".incomplete").exists()


def test_failed_download_ends_in_the_missing_file_report(tmp_path: Path, hub: str) -> None:
    url = f"{hub}/DeepBeepMeep/Z-Image/resolve/main/ZImageTurbo_bf16.safetensors"  # 404 on this server
    with pytest.raises(MissingFilesError) as info:
        resolve_files([FileSpec("transformer", (url,))], "int8", CheckpointFolders(tmp_path / "ckpts"), download=download_file)
    message = str(info.value)
    assert f"download: {url}" in message and "download failed:" in message
    assert str(tmp_path / "ckpts" / "ZImageTurbo_bf16.safetensors") in message


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"abc")
    cache = HashCache(tmp_path / "ckpts" / ".hash_cache.json")
    assert cache.sha256(file) == hashlib.sha256(b"abc").hexdigest()
    import host.hashes

    monkeypatch.setattr(host.hashes, "_hash_file", lambda path: pytest.fail("hashed twice"))
    assert HashCache(cache.cache_file).sha256(file) == hashlib.sha256(b"abc").hexdigest()  # from the JSON cache
    monkeypatch.undo()
    file.write_bytes(b"abcd")
    assert HashCache(cache.cache_file).sha256(file) == hashlib.sha256(b"abcd").hexdigest()


def test_after_one_failed_download_the_others_are_not_tried(tmp_path: Path, hub: str) -> None:
    calls: list[str] = []

    def failing(entry: object, primary: Path) -> Path:
        calls.append(str(entry))
        raise OSError("network is unreachable")

    specs = [FileSpec(role, (f"{hub}/DeepBeepMeep/Z-Image/resolve/main/{role}.safetensors",)) for role in ("a", "b", "c")]
    with pytest.raises(MissingFilesError) as info:
        resolve_files(specs, "int8", CheckpointFolders(tmp_path), download=failing)
    assert len(calls) == 1
    message = str(info.value)
    assert "download failed: OSError: network is unreachable" in message
    assert message.count("not downloaded: an earlier download failed") == 2
