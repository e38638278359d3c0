"""Protects the web page end to end in a real browser (Debian's Chromium driven by Playwright): a photo
uploaded at desktop and phone sizes is cut out and shown with the download buttons within 1.5 screens,
both downloads are the server's full-size RGBA cutout and L mask, each photo's quality score and the
model that answered are shown in words, with a warning when the score is below the server's
quality_flag, and the page asks nothing of any host but the server."""
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import httpx
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


@pytest.fixture(scope="module")
def health(server) -> dict:
    return httpx.get(server + "/api/health", timeout=30).json()


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


def car_on_patches(size=(960, 640)) -> np.ndarray:
    """The drawn car on smooth random patches of colour, a background neither bundled model learnt: the
    pair is unsure of the car's outline (the everyday model answers it, with a low quality score)."""
    photo, silhouette = car_photo(size)
    patches = np.random.default_rng(0).integers(0, 256, (12, 18, 3), dtype=np.uint8)
    background = np.asarray(Image.fromarray(patches).resize(size, Image.BICUBIC))
    return np.where(silhouette[..., None], photo, background)


def check_quality(page, headers, health: dict):
    """The page shows the selected photo's quality score (X-Quality, to 2 decimals) and the model that
    answered (X-Model; "studio"/"everyday" when the server runs the pair), and the low-confidence warning
    exactly when the score is below /api/health's quality_flag."""
    from playwright.sync_api import expect
    score, model = float(headers["x-quality"]), headers["x-model"]
    names = [m["name"] for m in health.get("models", [])]
    kind = ("studio", "everyday")[names.index(model)] if names else ""
    who = f"{kind} model" if kind == model else f"{kind} model {model}".strip()  # "everyday model", not "... everyday"
    quality = page.get_by_test_id("quality")
    expect(quality).to_be_visible()
    expect(quality).to_contain_text(re.compile(rf"^Quality \d\.\d{{2,4}} \({re.escape(who)}\)"))
    shown = re.match(r"Quality (\S+)", quality.inner_text()).group(1)
    assert abs(float(shown) - score) <= 0.005 + 1e-9, (shown, score)
    warning = page.get_by_test_id("quality-warning")
    if score < health["quality_flag"]:
        expect(warning).to_be_visible()
        expect(warning).to_have_text(re.compile(r"^Low confidence: check this cutout before using it — the model "
                                                rf"(was unsure of|found no clear) .*\(quality {re.escape(shown)}\)\.$"))
    else:
        expect(warning).to_be_hidden()


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
def test_a_photo_is_cut_out_shown_and_downloaded_at_full_size(browser, server, health, viewport, tmp_path):
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
        with page.expect_response(lambda response: response.url.endswith("/api/segment"), timeout=WAIT_MS) as answer:
            page.get_by_test_id("file-input").set_input_files(photo)
        # done or failed (not 2 minutes of waiting for a failed photo), then the server's message if it failed
        expect(page.get_by_test_id("queue-item")).to_have_attribute("data-state", re.compile("done|error"), timeout=WAIT_MS)
        expect(page.get_by_test_id("error")).to_have_text("")
        expect(page.get_by_test_id("queue-item")).to_have_attribute("data-state", "done")
        cutout = page.get_by_test_id("result-cutout")
        expect(cutout).to_have_attribute("data-ready", "true")
        expect(cutout).to_be_visible()
        box = cutout.bounding_box()
        assert int(cutout.get_attribute("width")) > 0 and int(cutout.get_attribute("height")) > 0
        assert box["width"] > 0 and box["height"] > 0
        # \s: the page keeps each number and its "ms" together with a no-break space
        expect(page.get_by_test_id("time")).to_contain_text(re.compile(r"server\s\d+\sms"))
        expect(page.get_by_test_id("error")).to_have_text("")
        check_quality(page, answer.value.headers, health)
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


def mask_name(response) -> str:
    """The photo an /api/segment mask answer is for, from the name the server gives it (<stem>_mask.png)."""
    return re.search(r'filename="(.+)_mask\.png"', response.headers["content-disposition"]).group(1) + ".png"


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_each_photo_shows_its_own_quality_and_a_doubtful_one_is_flagged(browser, server, health, viewport, tmp_path):
    # Two photos, each with the server's real answer and score: a drawn studio car, and the same car on
    # patches of colour neither bundled model learnt (a doubtful outline). So that one lands on each side
    # of the flag whatever the models' calibration, the page is told a quality_flag between the two
    # scores (the server's own flag is checked in the test above).
    from playwright.sync_api import expect
    photos = {"studio_car.png": car_photo((960, 640))[0], "patches_car.png": car_on_patches()}
    scores = {}
    for name, photo in photos.items():
        Image.fromarray(photo).save(tmp_path / name)
        answer = httpx.post(server + "/api/segment", files={"image": (name, (tmp_path / name).read_bytes(), "image/png")},
                            data={"output": "mask", "edges": "soft"}, timeout=WAIT_MS / 1000)
        assert answer.status_code == 200, answer.text
        scores[name] = float(answer.headers["x-quality"])
    assert scores["studio_car.png"] - scores["patches_car.png"] >= 0.01, scores  # else choose other photos
    flag = round(sum(scores.values()) / 2, 4)
    context = browser.new_context(**VIEWPORTS[viewport])
    page = context.new_page()
    page.route("**/api/health", lambda route: route.fulfill(response=(real := route.fetch()),
                                                            json={**real.json(), "quality_flag": flag}))
    answers, problems = {}, []
    page.on("response", lambda response: answers.update({mask_name(response): response.headers})
            if response.url.endswith("/api/segment") and response.ok else None)
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(server + "/")
        expect(page.locator("#model-info")).to_contain_text("torch")
        page.get_by_test_id("file-input").set_input_files([tmp_path / name for name in photos])
        items = page.get_by_test_id("queue-item")
        expect(items).to_have_count(2)
        for i in range(2):
            expect(items.nth(i)).to_have_attribute("data-state", re.compile("done|error"), timeout=WAIT_MS)
            expect(page.get_by_test_id("error")).to_have_text("")
            expect(items.nth(i)).to_have_attribute("data-state", "done")
        assert {name: float(answers[name]["x-quality"]) for name in photos} == scores  # the same answers
        for i, name in enumerate(photos):
            item, low = items.nth(i), scores[name] < flag
            expect(item).to_have_attribute("data-low", str(low).lower())  # each its own score, in the list
            words = r"low\squality" if low else "quality"  # \s: the page's no-break spaces
            expect(item.locator(".state")).to_have_text(re.compile(rf"^{words}\s\d\.\d{{2,4}}$"))
            shown = float(re.search(r"\d\.\d+", item.locator(".state").inner_text()).group())
            assert abs(shown - scores[name]) <= 0.005 + 1e-9, (shown, scores[name])
            item.click()
            expect(item).to_have_attribute("aria-current", "true")
            expect(page.get_by_test_id("time")).to_contain_text(name)  # the selected photo's details are shown
            check_quality(page, answers[name], {**health, "quality_flag": flag})
        expect(page.get_by_test_id("status")).to_contain_text("2 of 2 photo(s) done. 1 with low confidence")
        expect(page.get_by_test_id("error")).to_have_text("")
        screenshot(page, f"{viewport}_low_quality", tmp_path)  # the doubtful photo selected, its warning shown
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORTS[viewport]["viewport"]["width"]
    finally:
        context.close()
    assert not problems, problems


def screenshot(page, viewport: str, folder: Path):
    """The whole page into the test's folder, and a copy in /tmp/shots/ to look at."""
    path = folder / f"{viewport}.png"
    page.screenshot(path=path, full_page=True)
    if os.access(SHOTS.parent, os.W_OK):
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
