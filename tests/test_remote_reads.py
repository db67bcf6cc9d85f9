"""Remote inputs arrive whole or not at all: a real HTTP server on this machine streams manifests and images chunked
(no Content-Length), slowly, cut short, or not at all, and redirects inward; every read either returns exactly the
bytes served or fails with one line that names the URL and what happened."""

import gzip
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from bridgecore.batch.sharding import ManifestError, read_inputs, read_manifest
from bridgecore.model.images import ImageLoadError, load_image
from bridgecore.remote import ALLOW_LINK_LOCAL_SETTING, PrivateAddressError, address_class
from bridgecore.storage import InputTooLargeError, read_limited, read_uri

ROWS = 3000


def _png() -> bytes:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)  # ~270 KB, incompressible
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _manifest() -> bytes:
    return "".join(json.dumps({"id": f"s{i:05d}", "image": f"http://example.invalid/{i}.png",
                               "instruction": "make the sky purple at dusk, keep the buildings"}) + "\n"
                   for i in range(ROWS)).encode()


FILES = {"manifest.jsonl": _manifest(), "picture.png": _png()}
FILES["manifest.jsonl.gz"] = gzip.compress(FILES["manifest.jsonl"])
FILES["bomb.jsonl.gz"] = gzip.compress(b"\n" * (64 << 20))  # 64 MiB of newlines in ~64 KB


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        mode, _, name = self.path.lstrip("/").partition("/")
        if mode == "silent":  # accepts, reads the request, never answers
            time.sleep(30)
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", name.replace("~", "/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = FILES.get(name)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if mode in ("length", "cut"):
            self.send_header("Content-Length", str(len(data)))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if head:
            return
        if mode == "length":
            self.wfile.write(data)
        elif mode == "cut":  # states the whole length, sends half, hangs up
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            pieces = [data[i:i + 4096] for i in range(0, len(data), 4096)]
            if mode == "cut-chunked":
                pieces = pieces[: len(pieces) // 2]
            for number, piece in enumerate(pieces):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                if mode == "trickle" or number % 64 == 0:
                    self.wfile.flush()
                    time.sleep(0.7 if mode == "trickle" else 0.002)  # the reader sees the body in many pieces
            if mode == "cut-chunked":
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def url(port: int, mode: str, name: str = "", host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/{mode}/{name}"


@pytest.fixture()
def short_limits(monkeypatch):
    monkeypatch.setenv("VISION_BRIDGE_HTTP_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("VISION_BRIDGE_HTTP_READ_TIMEOUT", "2")
    monkeypatch.setenv("VISION_BRIDGE_HTTP_TOTAL_TIMEOUT", "4")


@pytest.mark.parametrize("mode", ["chunked", "length"])
def test_a_whole_manifest_and_image_arrive_with_or_without_a_length(server, mode):
    assert read_manifest(url(server, mode, "manifest.jsonl")) == FILES["manifest.jsonl"]
    assert read_uri(url(server, mode, "picture.png")) == FILES["picture.png"]
    assert load_image(url(server, mode, "picture.png")).size == (300, 300)
    assert len(read_inputs(url(server, mode, "manifest.jsonl"))) == ROWS  # was 97 samples and rc 0 when chunked


def test_a_gzip_manifest_streams_and_a_bomb_is_refused_within_its_limit(server, monkeypatch):
    import tracemalloc

    assert read_manifest(url(server, "chunked", "manifest.jsonl.gz")) == FILES["manifest.jsonl"]
    monkeypatch.setenv("VISION_BRIDGE_MAX_MANIFEST_BYTES", str(1 << 20))
    tracemalloc.start()
    with pytest.raises(ManifestError, match="inflates to more than the limit of 1048576 bytes"):
        read_manifest(url(server, "chunked", "bomb.jsonl.gz"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20  # a few MB: inflated as it streams, not the bomb's 64 MiB


@pytest.mark.parametrize("mode", ["cut", "cut-chunked"])
def test_a_stream_cut_short_is_a_failed_read_never_a_shorter_input(server, mode, monkeypatch):
    import bridgecore.model.images as images

    monkeypatch.setattr(images, "INPUT_RETRY_SECONDS", 1.0)  # a cut stream is retried (a dropped connection)
    with pytest.raises(ManifestError) as refused:
        read_manifest(url(server, mode, "manifest.jsonl"), budget_s=0)
    assert url(server, mode, "manifest.jsonl") in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ImageLoadError, match="cut the response short|ended after"):
        load_image(url(server, mode, "picture.png"))


def test_a_silent_or_trickling_host_fails_in_its_time_limit(server, short_limits, monkeypatch):
    import bridgecore.model.images as images

    monkeypatch.setattr(images, "INPUT_RETRY_SECONDS", 3.0)  # an image's retry budget (20 s), shortened
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="sent nothing for 2 s"):
        load_image(url(server, "silent", "picture.png"))
    assert time.monotonic() - started < 10  # the read limit, retried within the image budget: not 600 s
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="total time limit|within 4 s"):
        load_image(url(server, "trickle", "picture.png"))  # a byte every 0.7 s: never silent for 2 s
    assert time.monotonic() - started < 15


def test_faults_end_in_one_line_naming_the_url(server, monkeypatch):
    import bridgecore.model.images as images

    monkeypatch.setattr(images, "INPUT_RETRY_SECONDS", 1.0)  # refused and DNS failures are retried as transient
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(ImageLoadError, match=rf"127.0.0.1:{port}.*connection refused"):
        load_image(f"http://127.0.0.1:{port}/a.png")
    with pytest.raises(ManifestError, match="connection refused"):
        read_manifest(f"http://127.0.0.1:{port}/m.jsonl", budget_s=0)
    with pytest.raises(ImageLoadError, match="could not be resolved"):
        load_image("http://no-such-host.invalid/a.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(url(server, "length", "missing.png"))


def _outside_address() -> str | None:
    """An address of this machine that is not loopback (None without one)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_redirects_may_not_lead_inward_and_link_local_is_refused(server, monkeypatch):
    inner = url(server, "length", "picture.png").replace("/", "~")
    assert load_image(url(server, "redirect", inner)).size == (300, 300)  # loopback to loopback: the user's own range
    outside = _outside_address()
    if outside is not None:
        assert address_class(outside) in ("private", "public")
        with pytest.raises(ImageLoadError, match="refused a redirect .* to a loopback one"):
            load_image(url(server, "redirect", inner, host=outside))
    with pytest.raises(ImageLoadError, match="link-local"):
        load_image("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(ManifestError, match="link-local"):
        read_manifest("http://169.254.169.254/m.jsonl", budget_s=0)
    assert address_class("169.254.169.254") == "link-local" and address_class("10.1.2.3") == "private"
    assert address_class("127.0.0.1") == "loopback" and address_class("8.8.8.8") == "public"
    monkeypatch.setenv(ALLOW_LINK_LOCAL_SETTING, "1")
    with pytest.raises(ImageLoadError) as allowed:  # allowed now: nothing answers there, so it fails otherwise
        load_image("http://169.254.169.254:1/latest", max_bytes=10)
    assert "link-local" not in str(allowed.value)
    assert issubclass(PrivateAddressError, PermissionError)


def test_local_reads_keep_their_limits(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * 100)
    assert read_limited(str(path), 100) == b"x" * 100
    with pytest.raises(InputTooLargeError):
        read_limited(str(path), 99)
    gz = tmp_path / "half.jsonl.gz"
    gz.write_bytes(gzip.compress(b"y" * 1000)[:-12])
    with pytest.raises(ValueError, match="not complete gzip data"):
        read_limited(str(gz), 10_000)
