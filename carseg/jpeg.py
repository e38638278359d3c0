"""JPEG structure read from the bytes: does a file that lacks its end marker hold every pixel?

A JPEG whose last 2 bytes (the end-of-image marker FF D9) are missing still holds every pixel when
the data stops exactly where that marker would begin (browsers and OpenCV show it; compare
python-pillow/Pillow#4215); one cut anywhere earlier misses pixels. images.load_image reads the first
kind and refuses the second: `lacks_only_its_end` tells them apart by the file's segments and scans
(scans_complete) and by decoding (needs_no_more_data).
"""
import math

import numpy as np

JPEG_END = b"\xff\xd9"  # the end-of-image marker
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (0xC4 is DHT, 0xCC DAC, 0xC8 reserved)
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive
# Two runs of bytes that differ in every bit, neither holding 0xFF (which would start a marker): put before
# the end marker of a JPEG that lacks it, they change its pixels if its last scan still needs data.
_JPEG_RUN = np.random.default_rng(0).integers(1, 255, 256, dtype=np.uint8)
JPEG_RUNS = (_JPEG_RUN.tobytes(), (255 - _JPEG_RUN).tobytes())


def lacks_only_its_end(data: bytes, decode) -> bool:
    """True when `data`, a JPEG without its end marker, holds every pixel: it ends inside a scan's data,
    the scans present code the whole image (scans_complete), and its pixels need no byte past the end
    (needs_no_more_data, with `decode` bytes -> array). The check decodes at full scale, so a JPEG read
    small (draft) is accepted or refused alike."""
    return not data.endswith(JPEG_END) and scans_complete(data) and needs_no_more_data(data, decode)


def scans_complete(data: bytes) -> bool:
    """True when a JPEG's bytes end inside a scan's entropy-coded data, every segment before it is whole, and
    the scans present code every DCT coefficient of every component to full precision, the last one in its
    last restart interval: whatever is missing is then the end of the last scan, not a later scan.

    Only Huffman-coded frames (baseline, extended, progressive) qualify: those are what the
    decoder check (needs_no_more_data) was tried on.
    """
    pos, frame, coded, interval = 2, None, {}, 0
    while True:
        while data[pos:pos + 2] == b"\xff\xff":  # fill bytes before a marker
            pos += 1
        if data[pos:pos + 1] != b"\xff" or pos + 4 > len(data):
            return False
        code, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if code in (0xD8, 0xD9) or length < 2 or len(segment) != length - 2:  # a second start, an end, a cut
            return False
        if code in SOF_MARKERS:
            frame = _frame(segment) if code in HUFFMAN_FRAMES else None
            if frame is None:
                return False
            coded = {component: set() for component in frame[2]}
        elif code == 0xDD:  # DRI: a restart marker every `interval` MCUs from here on
            interval = int.from_bytes(segment[:2], "big")
        elif code == 0xDA:  # SOS: a scan header, then its entropy-coded data
            scan = _scan(segment)
            if frame is None or scan is None or not set(scan[0]) <= coded.keys():
                return False
            components, first, last, low_bit = scan
            if low_bit == 0:  # coded to full precision (a progressive scan with low_bit > 0 is refined later)
                for component in components:
                    coded[component].update(range(first, last + 1))
            pos, restarts = _end_of_scan_data(data, pos + 2 + length)
            if pos is None:
                whole_image = all(len(coefficients) == 64 for coefficients in coded.values())
                last_interval = interval == 0 or restarts == math.ceil(_mcus(frame, components) / interval) - 1
                return whole_image and last_interval
            continue
        pos += 2 + length


def _frame(segment: bytes):
    """(width, height, {component id: (h, v) sampling}) from a frame header; None if it is short or its
    height comes later (a DNL marker)."""
    if len(segment) < 6 or len(segment) < 6 + 3 * segment[5]:
        return None
    height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
    sampling = {segment[6 + 3 * i]: (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(segment[5])}
    return (width, height, sampling) if height and width and all(h and v for h, v in sampling.values()) else None


def _scan(segment: bytes):
    """(component ids, first coefficient, last coefficient, successive-approximation low bit) of a scan header;
    None if it is short."""
    if not segment or len(segment) < 4 + 2 * segment[0]:
        return None
    n = segment[0]
    return [segment[1 + 2 * i] for i in range(n)], segment[1 + 2 * n], segment[2 + 2 * n], segment[3 + 2 * n] & 15


def _end_of_scan_data(data: bytes, pos: int):
    """(position of the marker after the entropy-coded data starting at pos, restart markers on the way);
    the position is None when the data runs to the end of the file."""
    restarts = 0
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None, restarts
        follower = data[pos + 1]
        if follower not in (0x00, 0xFF) and not 0xD0 <= follower <= 0xD7:
            return pos, restarts
        restarts += 0xD0 <= follower <= 0xD7
        pos += 1 if follower == 0xFF else 2  # FF 00 is a data byte 0xFF; FF FF is fill


def _mcus(frame, components) -> int:
    """MCUs in a scan: an interleaved one covers the frame in MCUs of the largest sampling factors' blocks,
    a one-component one covers that component in 8x8 blocks."""
    width, height, sampling = frame
    h_max, v_max = max(h for h, _ in sampling.values()), max(v for _, v in sampling.values())
    if len(components) > 1:
        return math.ceil(width / (8 * h_max)) * math.ceil(height / (8 * v_max))
    h, v = sampling[components[0]]
    return math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)


def needs_no_more_data(data: bytes, decode) -> bool:
    """True when the pixels `decode` (bytes -> array, ValueError for bytes it cannot decode) gets from `data`
    do not depend on what would follow it: decoded with the end marker right after it, and after either
    of two runs of bytes that differ in every bit (JPEG_RUNS), they come out identical. A scan cut short
    would decode those runs as its missing data and differ."""
    try:
        pixels = decode(data + JPEG_END)  # libjpeg pads a short scan with zero bits
        return all(np.array_equal(pixels, decode(data + run + JPEG_END)) for run in JPEG_RUNS)
    except ValueError:
        return False
