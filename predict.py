"""Cut cars out of photos: write a full-size mask (and optionally an overlay and a cutout) per image.

    python predict.py photos/ more/*.jpg --out-dir masks/ --cutout

For each input, OUT_DIR/<stem>_mask.png is a single-channel 0/255 PNG of the input's own size;
<stem>_cutout.png (--cutout) has soft, anti-aliased edges, as serve.py's default cutout.
OUT_DIR/quality.csv gives each mask the model that made it and a quality score (carseg/quality.py);
photos scoring below --flag-below are listed at the end as the ones to look at first.
Without --checkpoint, the bundled studio and everyday models are both loaded and each photo goes to
the one that knows its kind (router.py); --checkpoint runs that one model on every photo.
With a car-parts (multi-class) checkpoint, OUT_DIR/<stem>_parts.png is also written: a palette
("P") PNG whose pixel values index the class names listed one per line in OUT_DIR/classes.txt, and
the mask is the whole car (the parts' union, holes filled); --overlay then colours the parts and
adds a legend of the classes present under the photo.
A file that cannot be read, or an entry named as a photo that is no photo file (a dangling link, a
named pipe), is reported with its reason and the rest are still processed; the exit status is 1 if
any input failed. Each input is named as given: a link's outputs and row are named after the link.
Outputs are written atomically and never over an input, and --out-dir is created only once the run
starts. The --submission file is never an input, the checkpoint or an output, and an existing one is
replaced only with --overwrite (or --skip-existing, if it is a submission: its first line is
img,rle_mask), and never by a run that yields no row.

    torchrun --standalone --nproc_per_node=4 predict.py test/ --out-dir masks/ --submission sub.csv.gz

splits the inputs between the processes (one per GPU); the submission is the one a single process writes.
"""
import hashlib
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from carseg import atomic, cutout, distributed, quality
from config import PredictConfig, parse_config
from carseg.images import IMAGE_EXTENSIONS, encode, load_image
from carseg.inputs import collect_inputs, matches
from inference import Predictor, full_size_labels
from router import load_predictor, resolve_checkpoints
from carseg.labels import car_mask
from carseg.labels import palette
from carseg.plots import parts_overlay, with_legend
from carseg.rle import rle_encode
from carseg.submission import (merge_submission, refuse_existing_submission, remove_shards, submission_rows,
                               write_row)

log = logging.getLogger(__name__)
OUTPUT_SUFFIXES = ("_mask.png", "_parts.png", "_overlay.jpg", "_cutout.png")
LEGEND_WIDTHS = (128, 640)  # photo widths between which the overlay's legend is drawn at its own size
LEGEND_MIN_SHARE = 1e-4  # a class on a smaller share of the photo's pixels is left out of the legend
DONE = object()  # --skip-existing: a photo whose outputs are all on disk already
CLASSES_FILE = "classes.txt"  # a multi-class run's class names, one per line: what _parts.png values mean


def output_paths(paths, out_dir: Path):
    """Map each input to its mask path; refuse name clashes and outputs that would replace an input."""
    outputs, seen = {}, {}
    for path in paths:
        mask_path = out_dir.resolve() / f"{path.stem}_mask.png"
        if mask_path in seen:
            raise ValueError(f"{path} and {seen[mask_path]} would both write {mask_path.name}; "
                             "predict them into different --out-dir folders")
        seen[mask_path] = path
        outputs[path] = mask_path
    inputs = input_places(paths)
    for name in (CLASSES_FILE, quality.FILE):
        if out_dir.resolve() / name in inputs:
            raise ValueError(f"refusing to write over input {name}; choose another --out-dir")
    for mask_path in outputs.values():
        for suffix in OUTPUT_SUFFIXES:
            if sibling(mask_path, suffix) in inputs:
                raise ValueError(f"refusing to write over input {sibling(mask_path, suffix).name}; "
                                 "choose another --out-dir")
    return outputs


def input_places(paths) -> dict:
    """{each file name whose replacement would change an input: that input}: the input's own name and,
    for a symbolic link, the file it points to (writing there would change what the link shows)."""
    places = {path: path for path in paths}
    for path in paths:
        if path.is_symlink():
            places.setdefault(path.resolve(), path)
    return places


def refuse_out_dir_in_input_folders(cfg: PredictConfig):
    """Refuse an --out-dir that is a folder given as input (or, with --recursive, lies inside one).

    The first run works, but every later run over that folder takes the outputs for photos: its
    `<stem>_mask.png` are inputs whose own outputs it refuses to write over, so --skip-existing can
    never finish a killed run, and --recursive finds the masks of masks. Told now, before any work.
    """
    out_dir = Path(cfg.out_dir).resolve()
    for item in cfg.inputs:
        for folder in (match.resolve() for match in matches(item, cfg.recursive) if match.is_dir()):
            if out_dir == folder or (cfg.recursive and folder in out_dir.parents):
                where = "is" if out_dir == folder else "is inside"
                raise ValueError(f"--out-dir {cfg.out_dir} {where} the input folder {folder}: the next run over it "
                                 "would take the masks written there for photos (and --skip-existing could not "
                                 "finish this one); choose another --out-dir")


def sibling(mask_path: Path, suffix: str) -> Path:
    """The photo's output with `suffix` (one of OUTPUT_SUFFIXES) beside its <stem>_mask.png."""
    return mask_path.with_name(mask_path.name[:-len("_mask.png")] + suffix)


def output_suffixes(cfg: PredictConfig, multiclass: bool) -> list:
    """The outputs this run writes per photo, as the suffixes of their names."""
    return ["_mask.png"] + ["_parts.png"] * multiclass + ["_overlay.jpg"] * cfg.overlay + ["_cutout.png"] * cfg.cutout


def refuse_long_names(paths, outputs, suffixes, out_dir):
    """(the inputs whose every output name fits the file system's NAME_MAX, {other input: message}).

    Checked before any photo is predicted, so a photo whose mask name fits and whose cutout name does
    not (a 245-character stem: 254 and 256 bytes) gets a failure, not half its outputs. The limit is in
    bytes, not characters: 100 'é' are 200 bytes.
    """
    limit, kept, refused = atomic.name_max(out_dir), [], {}
    for path in paths:
        names = [sibling(outputs[path], suffix).name for suffix in suffixes]
        too_long = [name for name in names if len(os.fsencode(name)) > limit]
        if too_long:
            refused[str(path)] = (f"{path}: cannot write {too_long[0]}: its name is {len(os.fsencode(too_long[0]))} "
                                  f"bytes, more than the {limit} the file system of {out_dir} takes; rename the photo")
        else:
            kept.append(path)
    return kept, refused


def prepare_outputs(cfg: PredictConfig, paths, outputs, checkpoints):
    """Refuse --submission and --out-dir locations that cannot be written, a --submission that would
    replace an input, the checkpoint or an output of this run (even with --overwrite), and an existing
    --submission without --overwrite (or --skip-existing, for a submission file only): before any work.

    --out-dir itself is created only once the run starts (start_out_dir): a refused run leaves no folder.
    """
    problem = atomic.folder_problem(cfg.out_dir)
    if problem is not None:
        raise ValueError(f"--out-dir {cfg.out_dir}: {problem}")
    quality.refuse_foreign(cfg.out_dir)
    if not cfg.submission:
        return
    csv_path = Path(cfg.submission)
    if csv_path.is_dir():
        raise ValueError(f"--submission {csv_path} is a folder; give a file name, "
                         f"e.g. {csv_path / 'submission.csv.gz'}")
    if not csv_path.parent.is_dir() and csv_path.parent.resolve() != Path(cfg.out_dir).resolve():
        raise ValueError(f"--submission {csv_path}: {csv_path.parent} is not an existing folder")
    problem = atomic.folder_problem(csv_path.parent)
    if problem is not None:
        raise ValueError(f"--submission {csv_path}: {problem}")
    refuse_submission_over_inputs(cfg, paths, outputs, checkpoints)
    refuse_existing_submission(csv_path, cfg.overwrite, cfg.skip_existing)


def refuse_submission_over_inputs(cfg: PredictConfig, paths, outputs, checkpoints):
    """ValueError naming both if the --submission file is an input photo, the checkpoint, or one of the
    files this run writes in --out-dir (a photo's outputs, classes.txt, quality.csv), whatever --overwrite says: written
    last, the CSV would replace it. Compared as names in their folders and, for a file that exists, as
    files (device and inode), so a link or a name spelled otherwise is caught too. A name with a photo's
    extension is refused too: `--submission *.jpg`, which the shell expands to `--submission a.jpg
    b.jpg`, makes a.jpg, not an input then, the submission (it replaced a.jpg with CSV text)."""
    csv_path = Path(cfg.submission)
    target = csv_path.parent.resolve() / csv_path.name
    inputs = input_places(paths)
    if target in inputs:
        raise ValueError(f"--submission {csv_path} is the input {inputs[target]}: the submission would replace "
                         "it; give another --submission")
    makers = {mask_path: path for path, mask_path in outputs.items()}
    for suffix in OUTPUT_SUFFIXES:
        made_by = makers.get(target.with_name(target.name[:-len(suffix)] + "_mask.png"))
        if target.name.endswith(suffix) and made_by is not None:
            raise ValueError(f"--submission {csv_path} is the output {target.name} of {made_by}: the submission "
                             "would replace it; give another --submission")
    if target == Path(cfg.out_dir).resolve() / CLASSES_FILE:
        raise ValueError(f"--submission {csv_path} is the {CLASSES_FILE} a parts model writes in --out-dir; "
                         "give another --submission")
    if target == Path(cfg.out_dir).resolve() / quality.FILE:
        raise ValueError(f"--submission {csv_path} is the {quality.FILE} every run writes in --out-dir; "
                         "give another --submission")
    if csv_path.is_file():
        same = _file_id(csv_path)
        models = [Path(path) for path in checkpoints]
        for other in [*models, *paths]:
            if _file_id(other) == same:
                what = "the checkpoint" if other in models else "the input"
                raise ValueError(f"--submission {csv_path} is {what} {other} (the same file): the submission would "
                                 "replace it; give another --submission")
    if csv_path.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--submission {csv_path}: a photo's name ({csv_path.suffix}), not a CSV: give FILE.csv or "
                         "FILE.csv.gz (a pattern such as *.jpg right after --submission gives it the first photo)")


def _file_id(path: Path):
    """(device, inode) of the file `path` names, None if it cannot be read: equal for one file's names."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def start_out_dir(cfg: PredictConfig, class_names=None):
    """Create --out-dir once every check has passed (a run refused before any work leaves no empty
    folder behind), and write a parts model's classes.txt there first, so that even an interrupted run's
    part maps say what their values mean."""
    try:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {cfg.out_dir}: cannot create the folder: {err.strerror or err}")
    if class_names:
        atomic.write_text(Path(cfg.out_dir) / CLASSES_FILE, classes_text(class_names))


def classes_text(class_names) -> str:
    """classes.txt's text: the class names, one per line, in the order of the part maps' values."""
    return "".join(f"{name}\n" for name in class_names)


def refuse_other_classes(cfg: PredictConfig, class_names):
    """Refuse an --out-dir whose classes.txt is not this model's, whatever --overwrite says.

    It is a user's own file or an earlier run's with another parts model; either way replacing it would
    make the part maps already there mean other classes (and --skip-existing would keep them). The
    same text is rewritten unchanged: a rerun or a resumed run with the same model.
    """
    path = Path(cfg.out_dir) / CLASSES_FILE
    if not os.path.lexists(path):
        return
    try:
        same = path.is_file() and path.read_bytes() == classes_text(class_names).encode("utf-8")
    except OSError:
        same = False
    if not same:
        raise ValueError(f"{path} exists and does not list this model's {len(class_names)} classes "
                         f"({', '.join(class_names)}): the part maps there would be read with the wrong names; "
                         "choose another --out-dir, or remove it if it is an earlier run's")


def write_outputs(path: Path, mask_path: Path, prediction, cfg: PredictConfig, score: dict):
    """Write <stem>_mask.png (carrying its quality.csv row, see quality.mask_text) and, if asked, the
    overlay and the RGBA cutout; returns (mask path, RLE, score).

    prediction: (the 0/255 mask uint8 (H, W), the cutout's soft alpha uint8 (H, W) or None); see _predict.
    """
    pred_mask, alpha = prediction
    atomic.write_bytes(mask_path, encode(pred_mask, "png", text=quality.mask_text(score)))
    rle = rle_encode(pred_mask) if cfg.submission else None
    if cfg.overlay or cfg.cutout:
        image, _ = load_image(path)  # full resolution, upright RGB
        if cfg.overlay:
            atomic.write_bytes(mask_path.with_name(f"{path.stem}_overlay.jpg"),
                               encode(cutout.tint(image, pred_mask), "jpeg"))
        if cfg.cutout:
            write_cutout(path, mask_path, image, alpha)
    return mask_path, rle, score


def write_part_outputs(path: Path, mask_path: Path, labels: np.ndarray, cfg: PredictConfig, score: dict, class_names):
    """A multi-class model's outputs for one photo from its class-index map uint8 (H, W): the car mask,
    <stem>_parts.png and, if asked, the parts overlay with its legend and the cutout; returns (mask path,
    RLE, score) as write_outputs."""
    colours = palette(len(class_names))
    pred_mask = car_mask(labels)  # what Predictor.masks gives, without running the model a second time
    atomic.write_bytes(mask_path, encode(pred_mask, "png", text=quality.mask_text(score)))
    atomic.write_bytes(mask_path.with_name(f"{path.stem}_parts.png"), encode(labels, "png", colours))
    rle = rle_encode(pred_mask) if cfg.submission else None
    if cfg.overlay or cfg.cutout:
        image, _ = load_image(path)  # full resolution, upright RGB
        if cfg.overlay:
            shown = legend_classes(labels, len(class_names))
            overlay = legend_under(parts_overlay(image, labels, colours), class_names, colours, shown)
            atomic.write_bytes(mask_path.with_name(f"{path.stem}_overlay.jpg"), encode(overlay, "jpeg"))
        if cfg.cutout:
            write_cutout(path, mask_path, image, pred_mask)
    return mask_path, rle, score


def legend_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The class indices the overlay's legend lists: those on at least LEGEND_MIN_SHARE of the pixels
    of the class-index map (H, W), background included (with_legend drops it).

    Why not every class present: a model's stray specks (6 'wheel' pixels of 262144 on a bonnet) put
    entries in the legend that send the reader looking for a part that cannot be seen. _parts.png
    keeps every pixel.
    """
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    return np.flatnonzero(counts >= max(1.0, LEGEND_MIN_SHARE * labels.size))


def legend_under(overlay: np.ndarray, class_names, colours, present) -> np.ndarray:
    """The overlay (H, W, 3) with the legend of the `present` classes under it (plots.with_legend),
    uint8 (H + legend height, W, 3).

    plots draws the legend in fixed pixel sizes, right for a photo about LEGEND_WIDTHS[1] wide. A wider
    photo gets that legend enlarged, so it keeps its share of the picture (text 10 px high under a
    4000 px photo is a grey line once the photo is shown on a screen); a photo narrower than
    LEGEND_WIDTHS[0] gets a shrunk one rather than none (plots refuses widths under one swatch).
    """
    width = overlay.shape[1]
    drawn = int(np.clip(width, *LEGEND_WIDTHS))
    if drawn == width:
        return with_legend(overlay, class_names, colours, present)
    legend = with_legend(np.zeros((0, drawn, 3), np.uint8), class_names, colours, present)  # the strip alone
    height = max(1, round(legend.shape[0] * width / drawn))
    legend = cv2.resize(legend, (width, height), interpolation=cv2.INTER_CUBIC if width > drawn else cv2.INTER_AREA)
    return np.vstack([overlay, legend])


def write_cutout(path: Path, mask_path: Path, image: np.ndarray, alpha: np.ndarray):
    """<stem>_cutout.png: the photo (H, W, 3) RGB over a transparent background by `alpha` uint8 (H, W),
    with the car's own colour estimated in partly transparent edge pixels (cutout.composite), as serve.py's."""
    rgba = cutout.composite(image, alpha)
    atomic.write_bytes(mask_path.with_name(f"{path.stem}_cutout.png"), encode(rgba, "png"))


def _read(predictor, path, done):
    if path in done:
        return DONE  # --skip-existing: its outputs are on disk already, nothing to decode
    try:
        return predictor.read(path)
    except (ValueError, OSError) as err:
        return err


def _prefetch(paths, predictor, pool, depth, done=frozenset()):
    """Decode ahead in `pool`, keeping at most `depth` images in flight (bounded memory); DONE for `done` paths."""
    queue = deque()
    for path in paths:
        queue.append((path, pool.submit(_read, predictor, path, done)))
        if len(queue) >= depth:
            path, future = queue.popleft()
            yield path, future.result()
    while queue:
        path, future = queue.popleft()
        yield path, future.result()


def predict_files(cfg: PredictConfig):
    """Predict every input; returns (written mask paths, {input: error message}).

    With cfg.submission, each mask is also written run-length encoded to that CSV (gzip for .gz) as soon
    as it is made, in input order (submission_rows): memory stays bounded however many photos there are.
    A multi-class checkpoint also writes each photo's <stem>_parts.png and OUT_DIR/classes.txt.
    Raises ValueError (OSError) before loading the model when the outputs cannot be written.

    Under torchrun each process predicts one contiguous block of the sorted inputs (distributed.shard)
    and streams its rows into its own shard file (shard_path); rank 0 then merges the shards into the
    file one process writes (merge_submission). Every rank returns the whole run's result.
    """
    checkpoints = resolve_checkpoints(cfg.checkpoint)
    log.info("predicting with %s", " and ".join(atomic.shown(path) for path in checkpoints))
    paths, problems = collect_inputs(cfg.inputs, cfg.recursive)
    outputs = output_paths(paths, Path(cfg.out_dir))
    refuse_out_dir_in_input_folders(cfg)
    # Before any work: a folder that cannot be written fails now, not after every image.
    prepare_outputs(cfg, paths, outputs, checkpoints)
    device = distributed.device_for(cfg.device, distributed.current())
    predictor = load_predictor(checkpoints, device, cfg.precision, cfg.tta, cfg.threshold, cfg.backend)
    log.info("%s", predictor.describe())
    multiclass = predictor.spec.multiclass
    paths, refused = refuse_long_names(paths, outputs, output_suffixes(cfg, multiclass), cfg.out_dir)
    problems = {**{problem: problem for problem in problems}, **refused}  # the same on every rank
    write = _writer(predictor, cfg)
    start_out_dir(cfg, predictor.spec.class_names if multiclass else None)
    # Joined only now: every check above fails alike on every rank, so a bad option ends each process
    # at once rather than leaving the others waiting for it in a collective.
    world = distributed.start(predictor.device)
    share = distributed.shard(len(paths), world)
    block = paths[share.start:share.stop]
    done = _start_block(paths, block, outputs, cfg, multiclass, world)
    scores = []  # this rank's quality.csv rows, in input order
    with submission_rows(cfg.submission, world) as rows:
        written, failures = _predict_block(block, outputs, done, predictor, write, cfg, rows, world.bars, scores)
    scores = [r for part in distributed.gather(scores, world) for r in part]
    written, failures = _gather_results(written, failures, problems, world)  # also waits for every shard
    if world.main:
        if cfg.submission and world.distributed:
            merge_submission(cfg.submission, world.size)
        if scores:
            quality.update(cfg.out_dir, scores, [outputs[path] for path in paths])
        _report(cfg, multiclass, written, failures)
        _report_flagged(cfg, scores)
    distributed.stop(world)
    return written, failures


def _predict_block(paths, outputs, done, predictor, write, cfg: PredictConfig, rows, bars, scores):
    """Predict `paths` in order, writing each photo's outputs and, with `rows`, its submission row;
    returns (written mask paths, {input: error message}) and appends each written photo's quality.csv
    row to `scores`. `done`: the photos to reuse (--skip-existing; their earlier rows are kept)."""
    written, failures = [], {}
    with ThreadPoolExecutor(2) as readers, ThreadPoolExecutor(2) as writers, \
            tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True,
                 disable=bars) as bar:
        decoded = _prefetch(paths, predictor, readers, 2 * cfg.batch_size, done)
        pending = deque()
        for batch in _batches(decoded, cfg.batch_size, failures, bar):
            if batch[0][1] is DONE:  # in input order with the others, so submission rows stay in input order
                path = batch[0][0]
                pending.append((path, writers.submit(reuse_outputs, path, outputs[path], cfg)))
                continue
            answers = predictor.answer([image for _, (image, _) in batch])
            full_sizes = [full_size for _, (_, full_size) in batch]
            # Multi-class: the class maps; each writer derives its car mask from its map (car_mask).
            predictions = _predict(predictor, answers, full_sizes, cfg)
            for (path, _), prediction, answer in zip(batch, predictions, answers):
                score = quality.row(path, outputs[path], answer.model, answer.quality, cfg.flag_below)
                pending.append((path, writers.submit(write, path, outputs[path], prediction, cfg, score)))
            while pending and (pending[0][1].done() or len(pending) > 4 * cfg.batch_size):
                _collect(pending.popleft(), written, rows, failures, bar, scores)
        while pending:
            _collect(pending.popleft(), written, rows, failures, bar, scores)
    return written, {str(k): v for k, v in failures.items()}


def _start_block(paths, block, outputs, cfg: PredictConfig, multiclass: bool, world) -> frozenset:
    """Before any rank writes: rank 0 removes what a killed run left (remove_leftovers), each rank finds
    the photos of its block that are finished already (--skip-existing), and all check that they
    collected the same inputs. Returns this rank's finished photos."""
    if world.main:
        remove_leftovers(cfg)
    done = finished(block, outputs, cfg, multiclass) if cfg.skip_existing else frozenset()
    # The gather is also the barrier after rank 0's clean-up: no rank writes before every rank is here.
    views = distributed.gather((_names_digest(paths), len(done)), world)
    if len({digest for digest, _ in views}) > 1:
        raise ValueError("the processes found different inputs: every machine must see the same files "
                         "at the same paths")
    skipped = sum(count for _, count in views)
    if skipped:
        log.info("--skip-existing: %d of %d photo(s) have all their outputs already; predicting the other %d",
                 skipped, len(paths), len(paths) - skipped)
    return done


def _names_digest(paths) -> str:
    """What the ranks compare to be sure they split one list: its file names, in order. As the file
    system's bytes (os.fsencode): a Latin-1 'café.jpg' is not UTF-8; NUL between them, as no name holds it."""
    return hashlib.sha256(b"\0".join(os.fsencode(path.name) for path in paths)).hexdigest()


def _gather_results(written, failures: dict, problems: dict, world):
    """The whole run's (written, failures) on every rank: the input problems (the same on every rank),
    then each rank's failures, in rank order (so in input order), as one process lists them."""
    gathered = distributed.gather((written, failures), world)
    written = [path for part, _ in gathered for path in part]
    merged = dict(problems)
    for _, part in gathered:
        merged.update(part)
    return written, {key: atomic.shown(message) for key, message in merged.items()}  # messages are read; keys are data


def _predict(predictor, answers, full_sizes, cfg: PredictConfig) -> list:
    """What each photo's writer needs from its inference.Answer: a parts model's class map (the writer
    derives its car mask); else (0/255 mask, soft alpha for --cutout or None), both from one upsampled
    probability (each answer at its own model's size and threshold: a Router mixes two models)."""
    if predictor.spec.multiclass or not cfg.cutout:
        labels = [full_size_labels(a.probs, size, a.threshold) for a, size in zip(answers, full_sizes)]
        return labels if predictor.spec.multiclass else [(mask * 255, None) for mask in labels]
    probs = [Predictor.upsample(a.probs, size).cpu().numpy() for a, size in zip(answers, full_sizes)]
    return [(cutout.hard_alpha(prob, a.threshold), cutout.soft_alpha(prob, a.threshold)) for prob, a in zip(probs, answers)]


def _writer(predictor, cfg: PredictConfig):
    """The per-photo writer for the predictor's kind of model: write_outputs for a car/background
    model; for a multi-class one write_part_outputs bound to its class names, once its options and the
    classes.txt of --out-dir are found right for it (start_out_dir writes that file)."""
    if not predictor.spec.multiclass:
        return write_outputs
    if cfg.threshold is not None:  # refused as evaluate.py refuses it, before anything is written
        raise ValueError(f"--threshold {cfg.threshold}: the checkpoint is a {len(predictor.spec.class_names)}-class "
                         "parts model; each pixel takes its most probable class (argmax), which has no threshold")
    refuse_other_classes(cfg, predictor.spec.class_names)
    return partial(write_part_outputs, class_names=predictor.spec.class_names)


def _report(cfg: PredictConfig, multiclass: bool, written, failures):
    """Log each failure, then the end-of-run line: which outputs, for how many photos, how many failed.
    Here rather than in main: only predict_files knows whether the model wrote part maps."""
    for message in failures.values():
        log.error("failed: %s", message)
    log.info("wrote %s for %d photo(s) to %s; %d input(s) failed",
             atomic.shown(describe_outputs(cfg, multiclass)), len(written), atomic.shown(cfg.out_dir), len(failures))


def _report_flagged(cfg: PredictConfig, scores):
    """Name the photos of this run whose quality is below --flag-below, worst first: the ones to look at."""
    flagged = sorted((r for r in scores if r["flagged"] == "yes"), key=lambda r: float(r["quality"]))
    log.info("quality: %d of %d photo(s) below --flag-below %g%s (scores in %s)", len(flagged), len(scores),
             cfg.flag_below, ", worst first:" if flagged else "", atomic.shown(Path(cfg.out_dir) / quality.FILE))
    for r in flagged:
        log.info("  look at %s: quality %s (%s)", r["photo"], r["quality"], r["model"])


def describe_outputs(cfg: PredictConfig, multiclass: bool) -> str:
    """What a run writes per photo, in words, e.g. 'masks, part maps (classes.txt) and overlays'."""
    kinds = ["masks"] + [f"part maps ({CLASSES_FILE})"] * multiclass + ["overlays"] * cfg.overlay \
        + ["cutouts"] * cfg.cutout + [f"RLE rows in {cfg.submission}"] * bool(cfg.submission)
    return ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else kinds[0]


def _batches(decoded, batch_size, failures, bar):
    """Group decoded images into batches, recording decode failures as they come."""
    batch = []
    for path, item in decoded:
        if isinstance(item, Exception):
            failures[path] = str(item)
            bar.update(1)
            continue
        if item is DONE:
            if batch:
                yield batch
                batch = []
            yield [(path, DONE)]
            continue
        batch.append((path, item))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def finished(paths, outputs, cfg: PredictConfig, multiclass: bool) -> frozenset:
    """The inputs whose every output this run would write exists already (--skip-existing): a run over
    100,000 photos that was killed resumes where it stopped. Outputs are written atomically, so an
    existing file is a whole one."""
    suffixes = output_suffixes(cfg, multiclass)
    return frozenset(path for path in paths if all(sibling(outputs[path], s).is_file() for s in suffixes))


def reuse_outputs(path: Path, mask_path: Path, cfg: PredictConfig):
    """(mask path, its RLE read back from the mask PNG if a submission is written, its quality.csv row
    read back from the PNG's text or None) for a skipped photo."""
    score = quality.row_from_mask(path, mask_path, cfg.flag_below)
    if not cfg.submission:
        return mask_path, None, score
    # Not cv2.imread: given a name that is not UTF-8 (os.fsdecode's lone surrogates) it crashed the process.
    mask = cv2.imdecode(np.fromfile(mask_path, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read {mask_path} back for the submission")
    return mask_path, rle_encode(mask), score


def remove_leftovers(cfg: PredictConfig):
    """Delete what a killed run left behind (SIGKILL skips atomic_write's clean-up): the temporaries of
    --out-dir's outputs whose writers are gone, and --submission's shard files and their temporaries, of
    any number of processes (_text_file removes the submission's own). Rank 0 calls it before any rank
    writes, so none of them is this run's."""
    out_dir = Path(cfg.out_dir)
    for target in {atomic.temporary_target(tmp) for tmp in out_dir.glob(".*.tmp")}:
        if target.name.endswith(OUTPUT_SUFFIXES) or target.name == CLASSES_FILE:
            atomic.remove_stale_temporaries(target)
    if cfg.submission:
        remove_shards(cfg.submission)


def _collect(entry, written, rows, failures, bar, scores):
    path, future = entry
    try:
        mask_path, rle, score = future.result()
    except (OSError, ValueError) as err:
        failures[path] = f"{path}: cannot write output: {err}"
    else:
        written.append(mask_path)
        if score is not None:
            scores.append(score)
        if rows is not None:
            write_row(rows, path, rle, failures)
    bar.update(1)


def main(argv=None):
    logging.basicConfig(level=distributed.log_level(), format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_config(PredictConfig, argv, description=__doc__.splitlines()[0])
    try:
        written, failures = predict_files(cfg)
    except (OSError, ValueError) as err:  # FileNotFoundError, an output folder that cannot be written...
        # Without distributed.stop: its barrier would wait for ranks that did not fail; this process's
        # exit makes torchrun stop them.
        raise SystemExit(f"error: {atomic.shown(err)}")
    except KeyboardInterrupt:
        if distributed.first_process():
            print("interrupted: the masks written are complete and kept, the submission is not written; run the "
                  "same command with --skip-existing to finish", file=sys.stderr)
        raise SystemExit(130)
    if failures:
        sys.exit(1)
    return written


if __name__ == "__main__":
    main()
