"""Protects the web page end to end in a real browser (Debian's Chromium driven by Playwright): a photo
uploaded at desktop and phone sizes is cut out and shown with the download buttons within 1.5 screens,
both downloads are the server's full-size RGBA cutout and L mask, and the page asks nothing of any host
but the server."""
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import real_data_dir, skip_unless_required
from PIL import Image, ImageOps
from test_serve import car_photo

import loadtest

pytestmark = pytest.mark.slow  # torchrun, real data or a browser: .ci/run runs them (--run-slow)

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
VIEWPORTS = {"desktop": {"viewport": {"width": 1366, "height": 768}},
             "phone": {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True,
                       "has_touch": True}}
SHOTS = Path("/tmp/shots")  # copies of the screenshots, to look at after a run
WAIT_MS = 120_000  # a full-size photo on a busy 2-core machine


def chromium_path():
    """Debian's Chromium: the real binary when it is there (the /usr/bin wrapper prints a warning), else
    whatever `chromium` is on the PATH; None when there is none. Never `playwright install`."""
    real = Path("/usr/lib/chromium/chromium")
    return str(real) if real.is_file() else shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        skip_unless_required("Chromium not found (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_unless_required("the playwright package is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py --backend torch with the bundled model on a free loopback port: its base URL."""
    port, log = loadtest.free_port(), tmp_path_factory.mktemp("server") / "serve.log"
    proc = loadtest.start_server("torch", port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        loadtest.wait_for_health(url, proc, log, timeout_s=180)
        yield url
    finally:
        loadtest.stop_server(proc)


def photo_for(viewport: str, folder: Path) -> tuple:
    """(photo path, the car's upright silhouette or None). Desktop: a real Carvana photo when present
    (read in place), else a drawn car 960x640. Phone: a portrait 640x960 of a drawn car stored turned
    on its side with EXIF orientation 6, as phones write them."""
    real = sorted((real_data_dir() / "train").glob("*.jpg"))
    path = folder / f"{viewport}_car.jpg"
    if viewport == "desktop":
        if real:
            return real[0], None
        photo, silhouette = car_photo((960, 640))
        Image.fromarray(photo).save(path, quality=92)
        return path, silhouette
    band, car = car_photo((640, 426))
    photo = np.full((960, 640, 3), band[0, 0], np.uint8)  # the studio background above and below
    silhouette = np.zeros((960, 640), bool)
    photo[267:693], silhouette[267:693] = band, car
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise, so store it turned the other way
    Image.fromarray(np.rot90(photo, 1)).save(path, quality=92, exif=exif)
    return path, silhouette


def host_of(url: str):
    """The host a request went to (a blob: URL's origin's host); None for data: URLs."""
    return urllib.parse.urlsplit(url.removeprefix("blob:")).hostname


def download(page, button: str, folder: Path) -> Image.Image:
    """Click a download button and open the file the browser saved."""
    with page.expect_download(timeout=WAIT_MS) as info:
        page.get_by_test_id(button).click()
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    image = Image.open(path)
    image.load()
    return image


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_a_photo_is_cut_out_shown_and_downloaded_at_full_size(browser, server, viewport, tmp_path):
    from playwright.sync_api import expect
    photo, silhouette = photo_for(viewport, tmp_path)
    with Image.open(photo) as img:
        upright = ImageOps.exif_transpose(img).size
    context = browser.new_context(accept_downloads=True, **VIEWPORTS[viewport])
    page = context.new_page()
    requests, problems = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(server + "/")
        expect(page.locator("#model-info")).to_contain_text("torch")
        page.get_by_test_id("file-input").set_input_files(photo)
        expect(page.get_by_test_id("queue-item")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
        cutout = page.get_by_test_id("result-cutout")
        expect(cutout).to_have_attribute("data-ready", "true")
        expect(cutout).to_be_visible()
        box = cutout.bounding_box()
        assert int(cutout.get_attribute("width")) > 0 and int(cutout.get_attribute("height")) > 0
        assert box["width"] > 0 and box["height"] > 0
        # \s: the page keeps each number and its "ms" together with a no-break space
        expect(page.get_by_test_id("time")).to_contain_text(re.compile(r"server\s\d+\sms"))
        expect(page.get_by_test_id("error")).to_have_text("")
        button = page.get_by_test_id("download-cutout").bounding_box()  # not scrolled yet: page coordinates
        assert button["y"] + button["height"] <= 1.5 * VIEWPORTS[viewport]["viewport"]["height"]  # no long scroll
        screenshot(page, viewport, tmp_path)

        cut = download(page, "download-cutout", tmp_path)
        assert (cut.format, cut.mode, cut.size) == ("PNG", "RGBA", upright)
        mask = download(page, "download-mask", tmp_path)
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", upright)
        assert np.array_equal(np.asarray(cut)[..., 3], np.asarray(mask))  # the same options for both
        if silhouette is not None:  # the drawn car, found upright
            car = np.asarray(mask) >= 128
            assert (car & silhouette).sum() / (car | silhouette).sum() > 0.9
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORTS[viewport]["viewport"]["width"]
    finally:
        context.close()
    assert {host_of(url) for url in requests} - {None} == {"127.0.0.1"}, requests
    assert not problems, problems


def screenshot(page, viewport: str, folder: Path):
    """The whole page into the test's folder, and a copy in /tmp/shots/ to look at."""
    path = folder / f"{viewport}.png"
    page.screenshot(path=path, full_page=True)
    if os.access(SHOTS.parent, os.W_OK):
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
