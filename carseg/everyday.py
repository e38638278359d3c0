"""Everyday photos with partial truth: what the Car Parts Dataset's part polygons can say about a
whole-car mask, and the training labels made from them.

The polygons cover bumpers, glass, doors, lights, hood, mirrors, tailgate, trunk and wheels, not the
fenders, sills, roof or pillars between them. So inside a polygon is car; far from every polygon is
background; the band in between, hugging the car's outline, is unknown. Two uses:

- scoring a predicted car mask (`partial_scores`): **part recall**, the share of polygon pixels
  predicted car, and **background specificity**, the share of pixels outside the parts' convex hull,
  dilated by HULL_DILATION of the image side, predicted background; a photo is *usable* when both
  are at least USABLE. Only whole-car masks catch a missing fender; only this catches background
  painted as car, so both kinds of truth are needed.
- training labels (`complete_labels`): the band is labelled by a teacher (teacher.py) rather than
  ignored or called background. Ignoring it taught a halo (whole-car mean IoU 0.866); labelling it
  from rembg's U²-Netp gave 0.939 in 15 minutes (shared measurements of two short runs). Part
  polygons stay the authority where they exist.

Arrays are NumPy (H, W): masks bool, probabilities float32 in [0, 1].
"""
import cv2
import numpy as np

HULL_DILATION = 0.08  # of the image's longer side: the band beyond the hull that still may be car
USABLE = 0.9  # part recall and background specificity a usable photo reaches, both
TEACHER_CAR = 0.5  # teacher probability above which a band pixel is labelled car


def parts_union(class_map: np.ndarray) -> np.ndarray:
    """Class-index map (H, W) of a parts annotation -> bool (H, W): under any part polygon."""
    return class_map > 0


def dilated_hull(union: np.ndarray, dilation: float = HULL_DILATION) -> np.ndarray:
    """bool (H, W): the convex hull of the `union` pixels, dilated by `dilation` of the longer side.

    A photo with no part at all has no hull: all False (every pixel then counts as background).
    """
    hull = np.zeros(union.shape, np.uint8)
    points = cv2.findNonZero(union.astype(np.uint8))
    if points is None:
        return hull.astype(bool)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    radius = max(1, round(dilation * max(union.shape)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(hull, disk).astype(bool)


def partial_scores(car: np.ndarray, union: np.ndarray, hull: np.ndarray) -> dict:
    """A predicted car mask (bool (H, W)) against the partial truth: {"recall", "specificity", "usable"}.

    recall: share of the part pixels predicted car (1.0 where the photo has none); specificity: share
    of the pixels outside the dilated hull predicted background (1.0 where the hull covers everything).
    """
    parts, outside = union.sum(), (~hull).sum()
    recall = float((car & union).sum() / parts) if parts else 1.0
    specificity = float((~car & ~hull).sum() / outside) if outside else 1.0
    return {"recall": recall, "specificity": specificity, "usable": recall >= USABLE and specificity >= USABLE}


def complete_labels(union: np.ndarray, hull: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Whole-car training mask, uint8 (H, W) 0/255: the part polygons; inside the dilated hull, where
    the teacher's probability (float32 (H, W)) is above TEACHER_CAR; background everywhere else."""
    car = union | (hull & (teacher > TEACHER_CAR))
    return car.astype(np.uint8) * 255


def paint_out(image: np.ndarray, hull: np.ndarray, work_side: int = 128) -> np.ndarray:
    """The photo (uint8 (H, W, 3)) with its dilated hull painted over from the pixels around it
    (OpenCV's Telea inpainting at a reduced size, so a 512x512 photo takes a few ms; outside the hull
    the pixels stay the photo's own): a background without its car."""
    h, w = hull.shape
    scale = work_side / max(h, w)
    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    small_hull = cv2.resize(hull.astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    filled = cv2.inpaint(small, cv2.dilate(small_hull, np.ones((3, 3), np.uint8)), 5, cv2.INPAINT_TELEA)
    filled = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.where(hull[..., None], filled, image)


def paste(background: np.ndarray, hull: np.ndarray, car: np.ndarray, car_mask: np.ndarray, width_scale: float):
    """A studio car pasted where an everyday photo's car was: (uint8 image (H, W, 3), uint8 0/255 mask).

    background: the everyday photo with its car painted out (paint_out); hull: that car's dilated
    hull (bool (H, W)); car, car_mask: a studio photo uint8 (h, w, 3) and its bool mask. The car, cut
    to its mask's box, is scaled to `width_scale` times the hull's width, centred on it and standing on
    the hull's lowest row; what falls outside the frame is cut off, as in a close-up. Edges are blended
    over one pixel; the mask is the pasted car's own.
    """
    rows, cols = np.nonzero(car_mask)
    car, car_mask = car[rows.min():rows.max() + 1, cols.min():cols.max() + 1], car_mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    hr, hc = np.nonzero(hull)
    width = max(8, round((hc.max() - hc.min() + 1) * width_scale))
    height = max(4, round(car.shape[0] * width / car.shape[1]))
    car = cv2.resize(car, (width, height), interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(car_mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    left, top = round((hc.min() + hc.max()) / 2 - width / 2), hr.max() + 1 - height
    H, W = hull.shape
    y0, y1, x0, x1 = max(top, 0), min(top + height, H), max(left, 0), min(left + width, W)
    image, mask = background.copy(), np.zeros((H, W), np.uint8)
    if y0 >= y1 or x0 >= x1:
        return image, mask
    a = alpha[y0 - top:y1 - top, x0 - left:x1 - left, None]
    region = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = np.rint(a * car[y0 - top:y1 - top, x0 - left:x1 - left] + (1 - a) * region).astype(np.uint8)
    mask[y0:y1, x0:x1] = (a[..., 0] > 0.5).astype(np.uint8) * 255
    return image, mask
