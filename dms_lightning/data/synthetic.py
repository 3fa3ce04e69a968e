"""The procedural synthetic DMS dataset: near-infrared-looking driver face crops, rendered on the fly.

Every image is a pure function of ``(seed, split, index)``, so the set needs no files, is identical on
every machine and every DDP rank, and can be made as large as wanted. A scene is first *sampled* (a
:class:`Scene`: the label's latent factors plus nuisance factors) and then *rendered* with soft-edged
primitives in a normalised coordinate frame, so the same scene renders at any ``image_size``.

Why it is not trivially separable: the label lives in a few continuous latent factors whose class
ranges nearly touch (eye openness 0.15 vs 0.5, mouth opening 0.35 vs 0.6, head yaw 20° vs 35°,
texting pitch vs looking-at-lap pitch), and nuisance factors a real NIR cabin camera shows are laid over
them: head pose, scale and position jitter, active-illumination fall-off, gain and gamma, sensor and shot
noise, defocus and motion blur, glasses with lens glare, hands on the face, a steering-wheel rim, a seat
belt, sunlight through a window. A large network resolves the narrow margins under noise better than a
small one, which is what a distillation benchmark needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

#: Class names of the synthetic set, in label order.
SYNTHETIC_CLASSES: tuple[str, ...] = ("alert", "eyes_closed", "yawning", "looking_away", "phone")

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "predict": 3}

# Class-defining latent ranges. The gaps between them are the "hard margin" of the task.
EYES_OPEN_RANGE = (0.5, 1.0)
EYES_CLOSED_RANGE = (0.0, 0.15)
MOUTH_NEUTRAL_RANGE = (0.0, 0.35)
MOUTH_YAWN_RANGE = (0.6, 1.0)
YAW_FORWARD_MAX_DEG = 20.0
YAW_AWAY_RANGE_DEG = (35.0, 70.0)
PITCH_LAP_RANGE_DEG = (26.0, 42.0)
PITCH_TEXTING_RANGE_DEG = (8.0, 18.0)


@dataclass
class Scene:
    """The latent factors of one image. ``label`` indexes :data:`SYNTHETIC_CLASSES`."""

    label: int
    eye_openness: float
    mouth_open: float
    yaw: float  # radians, + = driver turns to image right
    pitch: float  # radians, + = looking down
    roll: float
    center: tuple[float, float]
    scale: float
    gaze: tuple[float, float]
    skin: float
    hair: float
    background: float
    bright_pupil: bool
    phone: str | None  # None, "ear" or "texting"
    phone_side: int
    hand_on_face: bool
    glasses: bool
    glare: tuple[float, float, float] | None
    steering_wheel: bool
    seat_belt: bool
    window: tuple[float, float, float] | None
    light_center: tuple[float, float]
    falloff: float
    gain: float
    gamma: float
    blur_sigma: float
    motion_blur: int
    noise_sigma: float
    shot_noise: float
    noise_seed: int
    extras: dict = field(default_factory=dict)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample; independent of every other sample and of worker layout."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], int(index)]))


def sample_scene(rng: np.random.Generator, label: int) -> Scene:
    """Draw the latent and nuisance factors of one image of class ``label``."""
    u = rng.uniform
    deg = math.radians
    name = SYNTHETIC_CLASSES[label]

    eye_openness = u(*EYES_OPEN_RANGE)
    mouth_open = u(*MOUTH_NEUTRAL_RANGE)
    yaw = deg(u(-YAW_FORWARD_MAX_DEG, YAW_FORWARD_MAX_DEG))
    pitch = deg(u(-10.0, 12.0))
    phone = None
    if name == "eyes_closed":
        eye_openness = u(*EYES_CLOSED_RANGE)
    elif name == "yawning":
        mouth_open = u(*MOUTH_YAWN_RANGE)
        eye_openness = u(0.15, 0.75)  # people squint while yawning
        pitch = deg(u(-14.0, 4.0))
    elif name == "looking_away":
        if rng.random() < 0.7:
            yaw = deg(u(*YAW_AWAY_RANGE_DEG)) * rng.choice((-1.0, 1.0))
        else:
            pitch = deg(u(*PITCH_LAP_RANGE_DEG))
    elif name == "phone":
        phone = "ear" if rng.random() < 0.6 else "texting"
        if phone == "texting":
            pitch = deg(u(*PITCH_TEXTING_RANGE_DEG))
    glasses = rng.random() < 0.3
    return Scene(
        label=label,
        eye_openness=eye_openness,
        mouth_open=mouth_open,
        yaw=yaw,
        pitch=pitch,
        roll=deg(u(-14.0, 14.0)),
        center=(u(-0.08, 0.08), u(-0.06, 0.1)),
        scale=u(0.95, 1.2),
        gaze=(u(-0.5, 0.5), u(-0.3, 0.3)),
        skin=u(0.5, 0.8),
        hair=u(0.08, 0.35),
        background=u(0.04, 0.22),
        bright_pupil=rng.random() < 0.2,
        phone=phone,
        phone_side=int(rng.choice((-1, 1))),
        hand_on_face=phone is None and rng.random() < 0.2,
        glasses=glasses,
        glare=(u(-0.1, 0.1), u(-0.05, 0.05), u(0.02, 0.06)) if glasses and rng.random() < 0.5 else None,
        steering_wheel=rng.random() < 0.35,
        seat_belt=rng.random() < 0.5,
        window=(u(0.4, 0.95), u(-1.0, 1.0), u(0.2, 0.6)) if rng.random() < 0.2 else None,
        light_center=(u(-0.3, 0.3), u(-0.3, 0.3)),
        falloff=u(0.15, 0.6),
        gain=u(0.65, 1.3),
        gamma=u(0.8, 1.25),
        blur_sigma=u(0.0, 0.9),
        motion_blur=int(rng.integers(2, 5)) if rng.random() < 0.15 else 0,
        noise_sigma=u(0.01, 0.04),
        shot_noise=u(0.0, 0.04),
        noise_seed=int(rng.integers(2**31)),
        extras={"hand_pos": (u(-0.15, 0.15), u(0.15, 0.45)), "phone_angle": u(-0.35, 0.35)},
    )


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(coords, coords)  # x (columns), y (rows), both in [-1, 1]


class _Canvas:
    """Soft-edged primitives composited over a float image in [-1, 1]² coordinates."""

    def __init__(self, size: int, value: float) -> None:
        self.x, self.y = _grid(size)
        self.image = np.full((size, size), value, dtype=np.float32)
        self.edge = 1.5 / size  # anti-aliasing width: about one pixel

    def _soft(self, signed_inside: np.ndarray) -> np.ndarray:
        return np.clip(signed_inside / self.edge + 0.5, 0.0, 1.0)

    def _local(self, x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float):
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = x - cx, y - cy
        return c * dx + s * dy, -s * dx + c * dy

    def ellipse_alpha(self, x, y, cx, cy, rx, ry, angle=0.0) -> np.ndarray:
        lx, ly = self._local(x, y, cx, cy, angle)
        d = np.sqrt((lx / rx) ** 2 + (ly / ry) ** 2)
        return self._soft((1.0 - d) * min(rx, ry))

    def rect_alpha(self, x, y, cx, cy, half_w, half_h, angle=0.0) -> np.ndarray:
        lx, ly = self._local(x, y, cx, cy, angle)
        return self._soft(half_w - np.abs(lx)) * self._soft(half_h - np.abs(ly))

    def paint(self, alpha: np.ndarray, value, opacity: float = 1.0) -> None:
        a = alpha * opacity
        self.image *= 1.0 - a
        self.image += a * value


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """Render ``scene`` as a ``size × size`` uint8 grayscale image."""
    cv = _Canvas(size, scene.background)
    gx, gy = cv.x, cv.y

    # Cabin background: window, head rest.
    if scene.window is not None:
        value, wx, width = scene.window
        cv.paint(cv.rect_alpha(gx, gy, wx, -0.85, width, 0.3, 0.2), value)
    cv.paint(cv.ellipse_alpha(gx, gy, scene.center[0] * 0.5, -0.25, 0.75, 0.8), scene.background + 0.12)

    # Head frame: roll and scale about the face centre; yaw/pitch move the features.
    cx, cy = scene.center
    cos_r, sin_r = math.cos(scene.roll), math.sin(scene.roll)
    x = (cos_r * (gx - cx) + sin_r * (gy - cy)) / scene.scale
    y = (-sin_r * (gx - cx) + cos_r * (gy - cy)) / scene.scale
    yaw_shift = 0.5 * math.sin(scene.yaw)
    pitch_shift = 0.45 * math.sin(scene.pitch)
    face_w = 0.5 * (0.78 + 0.22 * math.cos(scene.yaw))
    face_h = 0.66
    vert = math.cos(scene.pitch)
    skin = scene.skin

    # Neck and shoulders, then hair, then the face with camera-side shading.
    cv.paint(cv.rect_alpha(x, y, 0.0, 0.85, 0.28, 0.3), skin * 0.7)
    cv.paint(cv.ellipse_alpha(x, y, 0.0, 1.25, 0.95, 0.45), scene.background + 0.05)
    cv.paint(cv.ellipse_alpha(x, y, -0.3 * yaw_shift, -0.1 - 0.3 * pitch_shift, face_w * 1.08, 0.8), scene.hair)
    shading = skin * (1.0 - 0.35 * ((x - 0.6 * yaw_shift) / face_w) ** 2 - 0.15 * (y / face_h) ** 2)
    cv.paint(cv.ellipse_alpha(x, y, 0.0, 0.05, face_w, face_h), shading)
    hairline = -0.42 + 0.35 * pitch_shift
    cv.paint(cv.ellipse_alpha(x, y, -0.3 * yaw_shift, hairline - 0.35, face_w * 1.02, 0.42), scene.hair)

    # Eyes: socket shading, almond opening, iris/pupil with the IR corneal glint, lid line, brow.
    eye_y = -0.1 + pitch_shift
    eye_half_w = 0.13
    for side in (-1, 1):
        ex = side * 0.2 * math.cos(scene.yaw) + yaw_shift
        if abs(ex) > face_w * 0.92:  # turned away: this eye is behind the nose/face edge
            continue
        squash = 1.0 - 0.6 * max(0.0, side * math.sin(scene.yaw))  # far eye foreshortened
        w = eye_half_w * squash
        cv.paint(cv.ellipse_alpha(x, y, ex, eye_y, w * 1.5, 0.1 * vert), skin * 0.78)
        cv.paint(cv.ellipse_alpha(x, y, ex, eye_y - 0.14 * vert, w * 1.2, 0.02), skin * 0.4)
        h = 0.12 * scene.eye_openness * vert
        dx = (x - ex) / w
        profile = np.clip(1.0 - dx**2, 0.0, None)
        upper = eye_y - h * profile
        lower = eye_y + 0.6 * h * profile
        opening = cv._soft(np.minimum(y - upper, lower - y)) * cv._soft(1.0 - np.abs(dx))
        if h > 0.004:
            cv.paint(opening, min(1.0, skin * 0.5 + 0.45))  # NIR sclera is bright
            px = ex + scene.gaze[0] * w * 0.5
            py = eye_y + scene.gaze[1] * h
            iris = cv.ellipse_alpha(x, y, px, py, 0.055 * squash, 0.055) * opening
            cv.paint(iris, 0.15)
            pupil = cv.ellipse_alpha(x, y, px, py, 0.025 * squash, 0.025) * opening
            cv.paint(pupil, 0.9 if scene.bright_pupil else 0.04)
            glint = cv.ellipse_alpha(x, y, px + 0.012, py - 0.012, 0.01, 0.01) * opening
            cv.paint(glint, 1.0)
        droop = 0.012 * (1.0 - scene.eye_openness)  # a closed lid curves down
        lid = cv._soft(0.007 - np.abs(y - upper - droop * profile)) * cv._soft(1.05 - np.abs(dx))
        cv.paint(lid, 0.08)

    # Nose and nostrils.
    nx = 1.1 * yaw_shift
    cv.paint(cv.rect_alpha(x, y, nx + 0.02, 0.07 + pitch_shift, 0.012, 0.12 * vert), skin * 0.82)
    for side in (-1, 1):
        cv.paint(cv.ellipse_alpha(x, y, nx + side * 0.035, 0.2 + pitch_shift, 0.018, 0.01), skin * 0.35)

    # Mouth: lips, dark interior, teeth when wide open.
    mx, my = 0.9 * yaw_shift, 0.38 + 0.8 * pitch_shift
    mw = 0.16 * (1.0 - 0.3 * abs(math.sin(scene.yaw))) * (1.0 - 0.25 * scene.mouth_open)
    mh = (0.012 + 0.15 * scene.mouth_open) * vert
    cv.paint(cv.ellipse_alpha(x, y, mx, my, mw + 0.02, mh + 0.02), skin * 0.72)
    cv.paint(cv.ellipse_alpha(x, y, mx, my, mw, mh), 0.08)
    if scene.mouth_open > 0.3:
        cv.paint(cv.rect_alpha(x, y, mx, my - mh * 0.75, mw * 0.6, mh * 0.12) * cv.ellipse_alpha(x, y, mx, my, mw, mh), 0.7)

    # Glasses: frames, bridge and a lens glare that can hide an eye.
    if scene.glasses:
        for side in (-1, 1):
            ex = side * 0.2 * math.cos(scene.yaw) + yaw_shift
            outer = cv.rect_alpha(x, y, ex, eye_y, 0.12, 0.075)
            inner = cv.rect_alpha(x, y, ex, eye_y, 0.105, 0.06)
            cv.paint(np.clip(outer - inner, 0.0, 1.0), 0.08)
        cv.paint(cv.rect_alpha(x, y, yaw_shift, eye_y - 0.02, 0.05, 0.008), 0.08)
        if scene.glare is not None:
            gx0, gy0, gr = scene.glare
            side = 1 if gx0 > 0 else -1
            ex = side * 0.2 * math.cos(scene.yaw) + yaw_shift
            cv.paint(cv.ellipse_alpha(x, y, ex + gx0, eye_y + gy0, gr * 1.6, gr, 0.5), 0.97, 0.85)

    # Hands and phones.
    hx, hy = scene.extras["hand_pos"]
    if scene.phone == "ear":
        px = scene.phone_side * (face_w + 0.02)
        angle = scene.extras["phone_angle"]
        cv.paint(cv.ellipse_alpha(x, y, px + scene.phone_side * 0.06, 0.25, 0.13, 0.17, angle), skin * 0.9)
        cv.paint(cv.rect_alpha(x, y, px, 0.02, 0.06, 0.2, angle), 0.12)
        cv.paint(cv.rect_alpha(x, y, px, 0.02, 0.045, 0.18, angle), 0.2)
    elif scene.phone == "texting":
        pgx, pgy = 0.25 * hx, 0.72 + 0.2 * hy
        angle = scene.extras["phone_angle"] * 0.5
        cv.paint(cv.ellipse_alpha(gx, gy, pgx - 0.12, pgy + 0.1, 0.12, 0.09), skin * 0.9)
        cv.paint(cv.rect_alpha(gx, gy, pgx, pgy, 0.16, 0.09, angle), 0.1)
        cv.paint(cv.rect_alpha(gx, gy, pgx, pgy, 0.14, 0.075, angle), 0.28)
        cv.paint(cv.ellipse_alpha(gx, gy, pgx + 0.14, pgy + 0.08, 0.1, 0.08), skin * 0.9)
    elif scene.hand_on_face:
        cv.paint(cv.ellipse_alpha(x, y, hx + scene.phone_side * 0.3, hy + 0.25, 0.16, 0.12, 0.4), skin * 0.95)

    # Seat belt and steering-wheel rim in front of everything else.
    if scene.seat_belt:
        cv.paint(cv.rect_alpha(gx, gy, 0.55, 0.9, 0.09, 0.6, 0.7), 0.3)
    if scene.steering_wheel:
        r = np.sqrt(gx**2 + (gy - 2.3) ** 2)
        cv.paint(cv._soft(0.07 - np.abs(r - 1.45)), 0.12)

    # Sensor: active-illumination fall-off, gain, gamma, blur, noise.
    lx, ly = scene.light_center
    illumination = np.clip(1.0 - scene.falloff * ((gx - lx) ** 2 + (gy - ly) ** 2), 0.15, None)
    img = np.clip(cv.image * illumination * scene.gain, 0.0, 1.0) ** scene.gamma
    img = _gaussian_blur(img, scene.blur_sigma * size / 96.0)
    if scene.motion_blur:
        img = _box_blur_horizontal(img, scene.motion_blur * max(1, size // 96))
    noise = np.random.default_rng(scene.noise_seed).standard_normal(img.shape).astype(np.float32)
    img = img + noise * (scene.noise_sigma + scene.shot_noise * np.sqrt(img))
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return img
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(img, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        out = np.zeros_like(img)
        for i, t in enumerate(taps):
            out += t * np.take(padded, np.arange(i, i + img.shape[axis]), axis=axis)
        img = out
    return img


def _box_blur_horizontal(img: np.ndarray, length: int) -> np.ndarray:
    padded = np.pad(img, [(0, 0), (length, length)], mode="edge")
    return sum(padded[:, i : i + img.shape[1]] for i in range(2 * length + 1)) / (2 * length + 1)


def render_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, int]:
    """The image (uint8, ``size × size``) and label of sample ``index`` of ``split``.

    Labels cycle through the classes so every split is balanced to within one sample per class.
    """
    rng = scene_rng(seed, split, index)
    label = index % len(SYNTHETIC_CLASSES)
    return render_scene(sample_scene(rng, label), size), label
