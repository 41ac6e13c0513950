"""SIMULATED vision modality: a pinhole camera watching a walker's ground-truth track.

The FTM/IMU data set has no camera. To exercise the vision encoder and the trajectory twin, this module
*simulates* person detections from the ground-truth track: one fixed pinhole camera per scene, 10 frames per
second, a detection box per frame (bottom-centre pixel ``u, v``, box width and height in pixels) with pixel
noise that grows with the box, random missed detections, and occlusion by seeded pillars standing between
the camera and the walker. Everything is seeded, so a run is reproducible. Nothing here is real camera data:
the CLI and the benchmark label this modality ``vision (simulated)``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

FPS = 10.0
PERSON_HEIGHT_M = 1.7
PERSON_WIDTH_M = 0.5
VISION_CHANNELS = ("u", "v", "box_w", "box_h", "detected", "floor_x", "floor_y")


@dataclass(frozen=True)
class PinholeCamera:
    """A camera at ``position`` (x, y, height) looking at ``target`` (x, y, z); focal length in pixels."""

    position: tuple[float, float, float]
    target: tuple[float, float, float]
    focal_px: float = 800.0
    width_px: int = 1280
    height_px: int = 720

    def _axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fwd = np.asarray(self.target, float) - np.asarray(self.position, float)
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        return right, down, fwd

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points ``(n, 3)`` to pixel ``u, v`` and depth along the optical axis (``<= 0``: behind)."""
        right, down, fwd = self._axes()
        rel = points - np.asarray(self.position, float)
        depth = rel @ fwd
        safe = np.where(depth > 1e-6, depth, np.nan)
        u = self.width_px / 2 + self.focal_px * (rel @ right) / safe
        v = self.height_px / 2 + self.focal_px * (rel @ down) / safe
        return u, v, depth

    def ground_point(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Back-project pixels onto the floor (z = 0): ``(n, 2)`` world x, y (NaN above the horizon)."""
        right, down, fwd = self._axes()
        x = (np.asarray(u, float) - self.width_px / 2) / self.focal_px
        y = (np.asarray(v, float) - self.height_px / 2) / self.focal_px
        rays = x[:, None] * right + y[:, None] * down + fwd
        cam = np.asarray(self.position, float)
        s = np.where(rays[:, 2] < -1e-9, -cam[2] / np.where(rays[:, 2] < -1e-9, rays[:, 2], -1.0), np.nan)
        return cam[:2] + s[:, None] * rays[:, :2]

    def in_image(self, u: np.ndarray, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
        return (depth > 0.5) & (u >= 0) & (u < self.width_px) & (v >= 0) & (v < self.height_px)


def camera_for_scene(points: np.ndarray, height_m: float = 4.0, focal_px: float = 800.0) -> PinholeCamera:
    """Place a camera so that every ground-truth point of a scene is in view: behind the track's minor axis,
    far enough for the major extent to fill about 80% of the image width."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre = (lo + hi) / 2
    ext = hi - lo
    major = int(np.argmax(ext))
    minor = 1 - major
    half_major = ext[major] / 2 + 1.0
    half_fov = math.atan(640 / focal_px)
    dist = half_major / (0.8 * math.tan(half_fov)) + ext[minor] / 2
    pos = centre.copy()
    pos[minor] = lo[minor] - (dist - ext[minor] / 2)
    return PinholeCamera(
        (float(pos[0]), float(pos[1]), height_m), (float(centre[0]), float(centre[1]), 0.8), focal_px
    )


@dataclass(frozen=True)
class VisionNoise:
    pixel_sigma: float = 2.0  # px, plus ``box_sigma_frac`` of the box height
    box_sigma_frac: float = 0.02
    miss_prob: float = 0.05
    pillars: int = 3  # occluding pillars placed between the camera and the track
    pillar_radius_m: float = 0.4


@dataclass
class SimulatedDetections:
    """Per frame: time, ``u, v`` (box bottom centre), ``box_w, box_h`` (px), ``detected`` (0/1), and the
    bottom centre back-projected to the floor with the (known) camera calibration; zeros when not detected."""

    t_ms: np.ndarray  # (n,)
    obs: np.ndarray  # (n, 5) in VISION_CHANNELS order; zeros when not detected
    floor_xy: (
        np.ndarray
    )  # (n, 2) the detected box's bottom centre back-projected to the floor (calibrated camera)
    truth_xy: np.ndarray  # (n, 2) the ground truth at frame times (for the tests and baselines)
    occluded: np.ndarray  # (n,) bool
    camera: PinholeCamera


def seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def simulate_detections(
    t_ms: np.ndarray,
    gt: np.ndarray,
    camera: PinholeCamera,
    seed: int,
    noise: VisionNoise | None = None,
    scene_points: np.ndarray | None = None,
) -> SimulatedDetections:
    """Simulate 10 fps detections of the walker whose ground truth is ``gt`` at ``t_ms``.

    Pillars are placed from ``seed`` alone (the same for every walk of a scene when ``scene_points`` is the
    scene's track); noise and missed detections are drawn from ``seed`` too.
    """
    noise = noise or VisionNoise()
    rng = np.random.default_rng(seed)
    frames = np.arange(t_ms[0], t_ms[-1] + 1e-9, 1000.0 / FPS)
    xy = np.column_stack([np.interp(frames, t_ms, gt[:, 0]), np.interp(frames, t_ms, gt[:, 1])])
    n = len(frames)
    feet = np.column_stack([xy, np.zeros(n)])
    heads = np.column_stack([xy, np.full(n, PERSON_HEIGHT_M)])
    u, v, depth = camera.project(feet)
    _, v_head, _ = camera.project(heads)
    box_h = v - v_head
    box_w = camera.focal_px * PERSON_WIDTH_M / np.where(depth > 1e-6, depth, np.nan)
    visible = camera.in_image(u, v, depth)
    occluded = np.zeros(n, dtype=bool)
    pts = scene_points if scene_points is not None else xy
    prng = np.random.default_rng(seed_for(seed, "pillars"))
    cam = np.asarray(camera.position[:2])
    for _ in range(noise.pillars):
        target = pts[prng.integers(len(pts))]
        pillar = cam + prng.uniform(0.5, 0.85) * (target - cam)
        seg = xy - cam
        seg_len = np.linalg.norm(seg, axis=1)
        proj = ((pillar - cam) @ seg.T) / np.maximum(seg_len, 1e-9)
        closest = cam + (proj / np.maximum(seg_len, 1e-9))[:, None] * seg
        dist = np.linalg.norm(closest - pillar, axis=1)
        occluded |= (dist < noise.pillar_radius_m) & (proj > 0) & (proj < seg_len)
    missed = rng.random(n) < noise.miss_prob
    detected = visible & ~occluded & ~missed
    sigma = noise.pixel_sigma + noise.box_sigma_frac * np.nan_to_num(box_h)
    obs = np.zeros((n, 5))
    jitter = rng.normal(size=(n, 4)) * sigma[:, None]
    obs[:, 0] = u + jitter[:, 0]
    obs[:, 1] = v + jitter[:, 1]
    obs[:, 2] = box_w + jitter[:, 2] * 0.3
    obs[:, 3] = box_h + jitter[:, 3]
    obs[:, 4] = 1.0
    obs[~detected] = 0.0
    floor = np.zeros((n, 2))
    if detected.any():
        floor[detected] = camera.ground_point(obs[detected, 0], obs[detected, 1])
    return SimulatedDetections(frames, np.nan_to_num(obs), np.nan_to_num(floor), xy, occluded, camera)
