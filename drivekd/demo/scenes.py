"""Synthetic driving scenes with questions whose answers follow from the drawing.

A scene is a straight three-lane road seen by the ego vehicle (middle lane), with vehicles (car,
truck, bus, motorcycle), pedestrians, a crosswalk and a traffic light ahead. It is drawn by a pinhole
camera model either as one front view or as the six nuScenes cameras (each a view of the same
scene). An object id buffer drawn alongside tells which objects are really visible, so questions
only refer to objects one can see. Everything is drawn without anti-aliasing from a seeded
`random.Random`, and saved as PNG, so the same seed gives byte-identical files.

`make_demo_data(out, ...)` writes under `out`:
  images/<frame_token>/<CAMERA>.png
  train.json       Drive-KD format (answers "Final: ...\\nSupport: ...")
  drivebench.json  DriveBench format about the same scenes (answer = letter for multiple choice)
  scenes.json      the scene specs the questions were derived from (ground truth for tests)

World frame: x to the right of the ego vehicle, z forward, y up (metres); the cameras sit at the
ego origin, 1.5 m above the road.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from drivekd.data.sample import CAMERA_ORDER
from drivekd.roles import CAPABILITIES

DEFAULT_SIZE = (224, 128)
MAX_QUESTIONS_PER_GROUP = 8

# Camera yaw in degrees, positive to the left of the ego heading.
CAMERA_YAW = {
    "CAM_FRONT_LEFT": 55.0, "CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": -55.0,
    "CAM_BACK_LEFT": 110.0, "CAM_BACK": 180.0, "CAM_BACK_RIGHT": -110.0,
}
HFOV_DEG = 80.0
CAM_HEIGHT = 1.5
HORIZON = 0.45  # fraction of the image height
NEAR = 1.0

LANE_W = 3.5
LANES = (-1, 0, 1)  # lane index; ego drives in lane 0, centre x = lane * LANE_W
ROAD_HALF = 1.5 * LANE_W
WALK_W = 2.75

LIGHT_RGB = {"red": (230, 30, 30), "yellow": (240, 200, 20), "green": (40, 200, 60)}
LAMP_OFF = (60, 60, 60)
LAMP_ORDER = ("red", "yellow", "green")  # top to bottom
VEHICLE_RGB = {
    "white": (235, 235, 235), "black": (30, 30, 35), "red": (180, 25, 25), "blue": (30, 60, 170),
    "silver": (160, 165, 170), "yellow": (220, 180, 40), "green": (40, 120, 60),
}
SHIRT_RGB = {"orange": (230, 120, 30), "purple": (120, 50, 150), "cyan": (40, 170, 190), "pink": (220, 110, 160)}
SKY, GROUND, ASPHALT, SIDEWALK, MARK = (150, 190, 230), (105, 135, 85), (80, 80, 84), (170, 168, 160), (240, 240, 240)
GLASS, WHEEL, SKIN, LEGS = (45, 55, 70), (15, 15, 15), (225, 185, 150), (40, 40, 60)
BRAKE_ON, BRAKE_OFF = (255, 40, 40), (110, 20, 20)

# kind: (width, height) in metres of the drawn face
VEHICLE_SIZE = {"car": (1.8, 1.5), "truck": (2.5, 3.3), "bus": (2.6, 3.1), "motorcycle": (0.8, 1.5)}
PEDESTRIAN_SIZE = (0.6, 1.75)

# Ego actions and the texts used for them in the questions.
ACTION_TEXT = {
    "stop": "Stop before the stop line and wait for the green light.",
    "prepare_stop": "Slow down and prepare to stop at the stop line.",
    "follow": "Slow down slightly and keep a safe distance from the vehicle ahead.",
    "keep": "Keep going straight at the same speed.",
    "accelerate": "Accelerate and change to the left lane.",
}
BEHAVIOUR_TEXT = {
    "stop": "The ego vehicle is going straight and decelerating to a stop.",
    "prepare_stop": "The ego vehicle is going straight and decelerating to a stop.",
    "follow": "The ego vehicle is going straight and slowing down slightly.",
    "keep": "The ego vehicle is going straight at a constant speed.",
}
BEHAVIOUR_DISTRACTORS = (
    "The ego vehicle is turning left quickly.",
    "The ego vehicle is accelerating and changing to the right lane.",
    "The ego vehicle is reversing slowly.",
)
DIRECTIONS = ("front", "front-left", "front-right", "back", "back-left", "back-right")
# DriveBench tag per (multiple choice, capability): 0 = MCQ, 1 = planning, 2 = perception, 3 = prediction open.
_OPEN_TAG = {"perception": 2, "reasoning": 3, "planning": 1}


# ----------------------------------------------------------------------------------- scene spec


def generate_scene(rng: random.Random, six_view: bool, light_colour: str | None = None) -> dict[str, Any]:
    """A random scene: traffic light, crosswalk, lead vehicle, other vehicles and pedestrians.

    light_colour: fix the traffic light (red / yellow / green) instead of drawing it uniformly; the
    benchmark (drivekd.demo.benchmark) uses it to balance its yes/no questions.
    """
    if light_colour is not None and light_colour not in LAMP_ORDER:
        raise ValueError(f"light_colour must be one of {', '.join(LAMP_ORDER)}, got {light_colour!r}")
    light_z = round(rng.uniform(22.0, 30.0), 2)
    colour = rng.choice(LAMP_ORDER)  # drawn even when fixed, so the rest of the scene keeps its draws
    if light_colour is not None:
        colour = light_colour
    stop_z = light_z - 4.0  # stop line; the crosswalk spans [stop_z + 0.5, stop_z + 3.5]
    objects: list[dict[str, Any]] = []

    def add(kind: str, colour: str, x: float, z: float, state: str) -> None:
        objects.append({"kind": kind, "colour": colour, "x": round(x, 2), "z": round(z, 2), "state": state})

    # Lead vehicle in the ego lane, before the stop line; brakes unless the light is green.
    lead_z = rng.uniform(9.0, stop_z - 3.0)
    lead_kind = rng.choice(("car", "car", "truck", "bus", "motorcycle"))
    add(lead_kind, rng.choice(list(VEHICLE_RGB)), 0.0, lead_z, "moving" if colour == "green" else "braking")

    # Other vehicles in the side lanes (and, with six views, behind the ego vehicle too).
    z_lo = -35.0 if six_view else 7.0
    taken: list[tuple[int, float]] = [(0, lead_z), (0, 0.0)]
    for _ in range(rng.randint(2, 5) if six_view else rng.randint(1, 3)):
        for _attempt in range(20):
            lane, z = rng.choice(LANES), rng.uniform(z_lo, 45.0)
            if lane == 0 and z > -8.0:  # the ego lane ahead holds only the lead vehicle
                continue
            if abs(z) < 6.0 or any(l == lane and abs(z - zz) < 9.0 for l, zz in taken):
                continue
            taken.append((lane, z))
            kind = rng.choice(("car", "car", "truck", "bus", "motorcycle"))
            state = "braking" if (z > 0 and z < stop_z and colour != "green") else "moving"
            add(kind, rng.choice(list(VEHICLE_RGB)), lane * LANE_W + rng.uniform(-0.3, 0.3), z, state)
            break

    # Pedestrians: on the sidewalks, and crossing on the crosswalk when the ego light is red.
    for _ in range(rng.randint(1, 3)):
        side = rng.choice((-1, 1))
        z = rng.uniform(-20.0 if six_view else 8.0, 35.0)
        if abs(z) < 5.0:
            z += 10.0
        add("pedestrian", rng.choice(list(SHIRT_RGB)), side * (ROAD_HALF + rng.uniform(0.6, WALK_W - 0.5)), z,
            "standing")
    if colour == "red":
        for _ in range(rng.randint(1, 2)):
            x = rng.choice((-1, 1)) * rng.uniform(2.0, ROAD_HALF - 0.5)
            add("pedestrian", rng.choice(list(SHIRT_RGB)), x, stop_z + rng.uniform(1.2, 2.8), "crossing")

    for i, o in enumerate(objects):
        o["oid"] = f"c{i + 1}"
    lead_gap = objects[0]["z"]
    if colour == "red":
        action = "stop"
    elif colour == "yellow":
        action = "prepare_stop"
    else:
        action = "follow" if lead_gap < 15.0 else "keep"
    return {
        "six_view": six_view,
        "traffic_light": {"colour": colour, "x": 5.8, "z": light_z, "height": 5.5},
        "stop_z": round(stop_z, 2),
        "objects": objects,
        "lead": "c1",
        "ego_action": action,
    }


# ------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Camera:
    yaw: float  # radians, positive to the left
    w: int
    h: int

    @property
    def focal(self) -> float:
        return (self.w / 2) / math.tan(math.radians(HFOV_DEG) / 2)

    def to_cam(self, x: float, z: float) -> tuple[float, float]:
        """(lateral, depth) in the camera frame for a world point on the ground plane."""
        s, c = math.sin(self.yaw), math.cos(self.yaw)
        return x * c + z * s, -x * s + z * c

    def project(self, lat: float, depth: float, y: float) -> tuple[float, float]:
        f = self.focal
        return self.w / 2 + f * lat / depth, self.h * HORIZON + f * (CAM_HEIGHT - y) / depth


def _clip_near(points: list[tuple[float, float]], closed: bool) -> list[list[tuple[float, float]]]:
    """Clip a ground polyline/polygon given in camera (lat, depth) to depth >= NEAR."""
    if closed:  # Sutherland-Hodgman against one plane
        out: list[tuple[float, float]] = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            cin, pin = cur[1] >= NEAR, prev[1] >= NEAR
            if cin != pin:
                t = (NEAR - prev[1]) / (cur[1] - prev[1])
                out.append((prev[0] + t * (cur[0] - prev[0]), NEAR))
            if cin:
                out.append(cur)
        return [out] if len(out) >= 3 else []
    a, b = points
    if a[1] < NEAR and b[1] < NEAR:
        return []
    if a[1] < NEAR or b[1] < NEAR:
        t = (NEAR - a[1]) / (b[1] - a[1])
        m = (a[0] + t * (b[0] - a[0]), NEAR)
        return [[m, b] if a[1] < NEAR else [a, m]]
    return [[a, b]]


def _ground(draw: ImageDraw.ImageDraw, cam: _Camera, pts_xz: list[tuple[float, float]], fill, closed=True,
            width=1) -> None:
    for part in _clip_near([cam.to_cam(x, z) for x, z in pts_xz], closed):
        xy = [cam.project(lat, d, 0.0) for lat, d in part]
        if closed:
            draw.polygon(xy, fill=fill)
        else:
            draw.line(xy, fill=fill, width=width)


def _draw_road(draw: ImageDraw.ImageDraw, cam: _Camera, stop_z: float) -> None:
    far = 120.0
    draw.rectangle([0, 0, cam.w, int(cam.h * HORIZON)], fill=SKY)
    draw.rectangle([0, int(cam.h * HORIZON), cam.w, cam.h], fill=GROUND)
    for side in (-1, 1):
        x0, x1 = side * ROAD_HALF, side * (ROAD_HALF + WALK_W)
        _ground(draw, cam, [(x0, -far), (x1, -far), (x1, far), (x0, far)], SIDEWALK)
    _ground(draw, cam, [(-ROAD_HALF, -far), (ROAD_HALF, -far), (ROAD_HALF, far), (-ROAD_HALF, far)], ASPHALT)
    for side in (-1, 1):  # solid edge lines
        _ground(draw, cam, [(side * (ROAD_HALF - 0.2), -far), (side * (ROAD_HALF - 0.2), far)], MARK, closed=False)
    for x in (-LANE_W / 2, LANE_W / 2):  # dashed lane lines (3 m dash every 8 m)
        for z in range(-int(far), int(far), 8):
            _ground(draw, cam, [(x, z), (x, z + 3.0)], MARK, closed=False)
    # stop line across the ego side and the crosswalk stripes
    _ground(draw, cam, [(-ROAD_HALF, stop_z), (ROAD_HALF, stop_z), (ROAD_HALF, stop_z + 0.4),
                        (-ROAD_HALF, stop_z + 0.4)], MARK)
    x = -ROAD_HALF + 0.3
    while x < ROAD_HALF - 0.3:
        _ground(draw, cam, [(x, stop_z + 0.8), (x + 0.6, stop_z + 0.8), (x + 0.6, stop_z + 3.8), (x, stop_z + 3.8)],
                MARK)
        x += 1.2


def _object_box(cam: _Camera, o: dict) -> tuple[int, int, int, int] | None:
    """Screen box of an object's face (a billboard facing the camera); None if behind the camera."""
    lat, depth = cam.to_cam(o["x"], o["z"])
    if depth < NEAR + 1.0:
        return None
    wm, hm = PEDESTRIAN_SIZE if o["kind"] == "pedestrian" else VEHICLE_SIZE[o["kind"]]
    u, v_bottom = cam.project(lat, depth, 0.0)
    _, v_top = cam.project(lat, depth, hm)
    half = max(1.5, cam.focal * wm / depth / 2)
    v_top = min(v_top, v_bottom - 3)
    box = (int(round(u - half)), int(round(v_top)), int(round(u + half)), int(round(v_bottom)))
    if box[2] < 0 or box[0] >= cam.w or box[3] < 0 or box[1] >= cam.h:
        return None
    return box


def _rect(draw: ImageDraw.ImageDraw, xy: list[int], fill) -> None:
    """A rectangle, skipped when tiny images make it degenerate (x1 < x0 or y1 < y0)."""
    if xy[2] >= xy[0] and xy[3] >= xy[1]:
        draw.rectangle(xy, fill=fill)


def _ellipse(draw: ImageDraw.ImageDraw, xy: list[int], fill) -> None:
    if xy[2] >= xy[0] and xy[3] >= xy[1]:
        draw.ellipse(xy, fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, o: dict, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    kind = o["kind"]
    if kind == "pedestrian":
        head = max(1, int(h * 0.12))
        cx = (x0 + x1) // 2
        _rect(draw, [x0, y0 + 2 * head, x1, y0 + int(h * 0.6)], fill=SHIRT_RGB[o["colour"]])
        _rect(draw, [x0 + w // 4, y0 + int(h * 0.6), x1 - w // 4, y1], fill=LEGS)
        _ellipse(draw, [cx - head, y0, cx + head, y0 + 2 * head], fill=SKIN)
        return
    body = VEHICLE_RGB[o["colour"]]
    brake = BRAKE_ON if o["state"] == "braking" else BRAKE_OFF
    wheel_h = max(1, h // 6)
    if kind == "car":
        _rect(draw, [x0, y0 + h // 3, x1, y1 - wheel_h], fill=body)
        _rect(draw, [x0 + w // 6, y0, x1 - w // 6, y0 + h // 3], fill=body)
        _rect(draw, [x0 + w // 6 + 1, y0 + 1, x1 - w // 6 - 1, y0 + h // 3], fill=GLASS)
    elif kind == "truck":
        _rect(draw, [x0, y0, x1, y1 - wheel_h], fill=(200, 200, 195))  # cargo box
        _rect(draw, [x0, y0 + int(h * 0.55), x1, y1 - wheel_h], fill=body)  # cab / bumper band
    elif kind == "bus":
        _rect(draw, [x0, y0, x1, y1 - wheel_h], fill=body)
        _rect(draw, [x0 + 1, y0 + h // 8, x1 - 1, y0 + int(h * 0.45)], fill=GLASS)
    else:  # motorcycle with rider
        cx = (x0 + x1) // 2
        _rect(draw, [x0, y0 + int(h * 0.55), x1, y1 - wheel_h], fill=body)
        _rect(draw, [x0, y0 + int(h * 0.2), x1, y0 + int(h * 0.55)], fill=LEGS)
        r = max(1, w // 2)
        _ellipse(draw, [cx - r, y0, cx + r, y0 + 2 * r], fill=GLASS)
    _rect(draw, [x0, y1 - wheel_h, x0 + max(1, w // 4), y1], fill=WHEEL)
    _rect(draw, [x1 - max(1, w // 4), y1 - wheel_h, x1, y1], fill=WHEEL)
    lamp = max(1, w // 8)
    ly = y1 - wheel_h - max(2, h // 4)
    if kind != "motorcycle":
        _rect(draw, [x0, ly, x0 + lamp, ly + lamp], fill=brake)
        _rect(draw, [x1 - lamp, ly, x1, ly + lamp], fill=brake)


def _draw_light(draw: ImageDraw.ImageDraw, cam: _Camera, light: dict) -> dict[str, list[int]] | None:
    """Draw pole and signal head; returns the lamp centres (px) or None if not in view."""
    lat, depth = cam.to_cam(light["x"], light["z"])
    if depth < NEAR + 1.0:
        return None
    u, vb = cam.project(lat, depth, 0.0)
    _, vt = cam.project(lat, depth, light["height"])
    s = cam.w / DEFAULT_SIZE[0]
    hw = max(3, int(round(3 * s)), int(cam.focal * 0.25 / depth))  # half width of the head
    r = hw - 1  # lamp radius
    step = 2 * r + 2
    u, vt = int(round(u)), int(round(vt))
    if u + hw < 0 or u - hw >= cam.w:
        return None
    head_top = max(1, vt - 3 * step)  # small images: hang the head lower so it stays in frame
    vt = head_top + 3 * step
    draw.line([(u, vt), (u, int(vb))], fill=(90, 90, 90), width=max(1, int(s)))
    draw.rectangle([u - hw, head_top - 1, u + hw, vt], fill=(20, 20, 20))
    centres = {}
    for i, name in enumerate(LAMP_ORDER):
        cy = head_top + r + 1 + i * step
        fill = LIGHT_RGB[name] if name == light["colour"] else LAMP_OFF
        draw.ellipse([u - r, cy - r, u + r, cy + r], fill=fill)
        centres[name] = [u, cy]
    return centres


def render_view(scene: dict[str, Any], camera: str, size: tuple[int, int] = DEFAULT_SIZE
                ) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one camera view. Returns the image and its layout: per object the box, the normalised
    centre and the visible fraction of its box (from an id buffer), and the traffic-light lamps."""
    w, h = size
    cam = _Camera(math.radians(CAMERA_YAW[camera]), w, h)
    img = Image.new("RGB", (w, h))
    ids = Image.new("L", (w, h), 0)  # object index + 1 per pixel, 255 = traffic light
    draw, idraw = ImageDraw.Draw(img), ImageDraw.Draw(ids)
    _draw_road(draw, cam, scene["stop_z"])
    boxes = {}
    order = sorted(range(len(scene["objects"])), key=lambda i: -cam.to_cam(scene["objects"][i]["x"],
                                                                            scene["objects"][i]["z"])[1])
    for i in order:  # far to near
        o = scene["objects"][i]
        box = _object_box(cam, o)
        if box is None:
            continue
        _draw_object(draw, o, box)
        idraw.rectangle(box, fill=i + 1)
        boxes[o["oid"]] = (i + 1, box)
    lamps = _draw_light(draw, cam, scene["traffic_light"])
    if lamps is not None:
        xs = [c[0] for c in lamps.values()]
        ys = [c[1] for c in lamps.values()]
        idraw.rectangle([min(xs) - 4, min(ys) - 4, max(xs) + 4, max(ys) + 4], fill=255)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=256)
    layout: dict[str, Any] = {"objects": {}, "lamps": lamps}
    for oid, (k, (x0, y0, x1, y1)) in boxes.items():
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        area = (x1 - x0 + 1) * (y1 - y0 + 1)
        layout["objects"][oid] = {
            "box": [x0, y0, x1, y1],
            "centre": [round(cx / w, 4), round(cy / h, 4)],
            "in_frame": 0 <= cx < w and 0 <= cy < h,
            "visible": round(float(counts[k]) / area, 3),
        }
    return img, layout


# ------------------------------------------------------------------------------------ questions


def _direction(o: dict) -> tuple[str, float]:
    """Direction of an object from the ego vehicle, and its angular margin to the nearest boundary."""
    bearing = math.degrees(math.atan2(o["x"], o["z"]))  # 0 ahead, + right
    a = abs(bearing)
    side = "right" if bearing > 0 else "left"
    bounds = (20.0, 90.0, 160.0)
    margin = min(abs(a - b) for b in bounds)
    if a < 20:
        return "front", margin
    if a < 90:
        return f"front-{side}", margin
    if a < 160:
        return f"back-{side}", margin
    return "back", margin


def _ref(scene: dict, oid: str) -> str:
    cam, (cx, cy) = scene["refs"][oid]
    return f"<{oid},{cam},{cx:.4f},{cy:.4f}>"


def _describe(scene: dict, oid: str) -> str:
    o = scene["by_id"][oid]
    dist = math.hypot(o["x"], o["z"])
    where = f"{_direction(o)[0]} of the ego vehicle, about {dist:.0f} m away"
    return f"the {o['colour']} {o['kind']} {_ref(scene, oid)} ({where})"


def _mcq(rng: random.Random, correct: str, distractors: list[str], n: int = 4) -> tuple[list[str], str]:
    opts = [correct] + rng.sample(distractors, min(n - 1, len(distractors)))
    rng.shuffle(opts)
    return opts, "ABCDEFG"[opts.index(correct)]


def _options_text(opts: list[str]) -> str:
    return "\n".join(f"{'ABCDEFG'[i]}. {t}" for i, t in enumerate(opts))


def _question_kinds(scene: dict) -> dict[str, list]:
    """Question makers per capability that apply to this scene."""
    vis = scene["refs"]
    vehicles = [o for o in scene["objects"] if o["kind"] != "pedestrian" and o["oid"] in vis]
    peds = [o for o in scene["objects"] if o["kind"] == "pedestrian" and o["oid"] in vis]
    lead_ok = scene["lead"] in vis
    per = [_q_light, _q_ped_count]
    if vehicles:
        per += [_q_vehicle_type, _q_vehicle_colour]
    if any(_direction(o)[1] >= 5.0 for o in scene["objects"] if o["oid"] in vis):
        per.append(_q_direction)
    rea = [_q_ego_behaviour] + ([_q_lead_stop] if lead_ok else []) + ([_q_ped_cross] if peds else [])
    pla = [_q_ego_action, _q_safe_actions] + ([_q_action_for_lead] if lead_ok else [])
    return {"perception": per, "reasoning": rea, "planning": pla}


def _q_light(scene, rng):
    c = scene["traffic_light"]["colour"]
    return dict(kind="light_colour", capability="perception", bench_type="perception", question=(
        "What is the colour of the traffic light ahead of the ego vehicle?"),
        short=c, support=f"the signal head above the road ahead shows the {c} lamp lit; the other lamps are dark.")


def _q_ped_count(scene, rng):
    n = scene["front_pedestrians"]
    return dict(kind="pedestrian_count", capability="perception", bench_type="perception",
                question="How many pedestrians are visible in the front view (CAM_FRONT)?", short=str(n),
                support=f"{n} pedestrian(s) can be seen in the front camera image, on the sidewalks or the crosswalk.")


def _q_vehicle_type(scene, rng):
    o = rng.choice([o for o in scene["objects"] if o["kind"] != "pedestrian" and o["oid"] in scene["refs"]])
    names = {"car": "Car", "truck": "Truck", "bus": "Bus", "motorcycle": "Motorcycle"}
    opts, letter = _mcq(rng, names[o["kind"]], [v for k, v in names.items() if k != o["kind"]])
    return dict(kind="vehicle_type", capability="perception", bench_type="perception", options=opts, letter=letter,
                question=f"What type of vehicle is {_ref(scene, o['oid'])}? Please select the correct answer from "
                f"the following options:\n{_options_text(opts)}",
                support=f"{_ref(scene, o['oid'])} is a {o['colour']} {o['kind']}.", object=o["oid"])


def _q_vehicle_colour(scene, rng):
    o = rng.choice([o for o in scene["objects"] if o["kind"] != "pedestrian" and o["oid"] in scene["refs"]])
    opts, letter = _mcq(rng, o["colour"].capitalize(), [c.capitalize() for c in VEHICLE_RGB if c != o["colour"]])
    return dict(kind="vehicle_colour", capability="perception", bench_type="perception", options=opts, letter=letter,
                question=f"What is the colour of the vehicle {_ref(scene, o['oid'])}? Please select the correct "
                f"answer from the following options:\n{_options_text(opts)}",
                support=f"{_ref(scene, o['oid'])} is a {o['colour']} {o['kind']}.", object=o["oid"])


def _q_direction(scene, rng):
    o = rng.choice([o for o in scene["objects"] if o["oid"] in scene["refs"] and _direction(o)[1] >= 5.0])
    d = _direction(o)[0]
    opts, letter = _mcq(rng, d.capitalize(), [x.capitalize() for x in DIRECTIONS if x != d])
    return dict(kind="direction", capability="perception", bench_type="perception", options=opts, letter=letter,
                question=f"Where is {_ref(scene, o['oid'])} relative to the ego vehicle? Please select the correct "
                f"answer from the following options:\n{_options_text(opts)}",
                support=f"{_describe(scene, o['oid'])}.", object=o["oid"])


def _q_lead_stop(scene, rng):
    lead, c = scene["lead"], scene["traffic_light"]["colour"]
    stops = c != "green"
    opts = ["Yes, it will stop.", "No, it will keep going."]
    letter = "A" if stops else "B"
    why = (f"its brake lights are on and the traffic light ahead is {c}" if stops
           else "the traffic light ahead is green and its brake lights are off")
    return dict(kind="lead_will_stop", capability="reasoning", bench_type="prediction", options=opts, letter=letter,
                question=f"Will the vehicle ahead {_ref(scene, lead)} stop? Please select the correct answer from "
                f"the following options:\n{_options_text(opts)}",
                support=f"{_describe(scene, lead)} is in the ego lane; {why}.", object=lead)


def _q_ego_behaviour(scene, rng):
    correct = BEHAVIOUR_TEXT[scene["ego_action"]]
    others = [t for t in dict.fromkeys(BEHAVIOUR_TEXT.values()) if t != correct] + list(BEHAVIOUR_DISTRACTORS)
    opts, letter = _mcq(rng, correct, others)
    return dict(kind="ego_behaviour", capability="reasoning", bench_type="behavior", options=opts, letter=letter,
                question="What is the ego vehicle's likely behaviour? Please select the correct answer from the "
                f"following options:\n{_options_text(opts)}", support=_action_reason(scene))


def _q_ped_cross(scene, rng):
    peds = [o for o in scene["objects"] if o["kind"] == "pedestrian" and o["oid"] in scene["refs"]]
    o = rng.choice(peds)
    crossing = o["state"] == "crossing"
    short = ("Yes, the pedestrian will cross in front of the ego vehicle." if crossing
             else "No, the pedestrian stays on the sidewalk.")
    why = ("the pedestrian is on the crosswalk ahead while the ego light is red" if crossing
           else "the pedestrian is standing on the sidewalk beside the road")
    return dict(kind="pedestrian_cross", capability="reasoning", bench_type="prediction", short=short,
                question=f"Will the pedestrian {_ref(scene, o['oid'])} cross in front of the ego vehicle?",
                support=f"{why} ({_direction(o)[0]} of the ego vehicle).", object=o["oid"])


def _q_ego_action(scene, rng):
    a = scene["ego_action"]
    opts, letter = _mcq(rng, ACTION_TEXT[a], [t for k, t in ACTION_TEXT.items() if k != a])
    return dict(kind="ego_action", capability="planning", bench_type="planning", options=opts, letter=letter,
                question="What should the ego vehicle do next? Please select the correct answer from the following "
                f"options:\n{_options_text(opts)}", support=_action_reason(scene))


def _q_action_for_lead(scene, rng):
    lead = scene["lead"]
    return dict(kind="action_for_object", capability="planning", bench_type="planning",
                question=f"What actions could the ego vehicle take based on {_ref(scene, lead)}? Why take this "
                "action and what's the probability?", short=ACTION_TEXT[scene["ego_action"]].rstrip("."),
                support=f"{_action_reason(scene)} Probability: high.", object=lead)


def _q_safe_actions(scene, rng):
    return dict(kind="safe_actions", capability="planning", bench_type="planning",
                question="In this scenario, what are safe actions to take for the ego vehicle?",
                short=ACTION_TEXT[scene["ego_action"]].rstrip("."), support=_action_reason(scene))


def _action_reason(scene: dict) -> str:
    a = scene["ego_action"]
    lead = _describe(scene, scene["lead"]) if scene["lead"] in scene["refs"] else "the vehicle ahead"
    if a == "stop":
        crossing = any(o["state"] == "crossing" for o in scene["objects"])
        return (f"The traffic light ahead is red and {lead} is braking"
                + (", and pedestrians are crossing on the crosswalk." if crossing else "."))
    if a == "prepare_stop":
        return f"The traffic light ahead is yellow and {lead} is braking before the stop line."
    if a == "follow":
        return f"The traffic light ahead is green, but {lead} is close in the ego lane."
    return f"The traffic light ahead is green and {lead} is far enough ahead in the ego lane."


def _make_questions(scene: dict, rng: random.Random, n: int) -> list[dict]:
    """n questions of distinct kinds, cycling perception -> reasoning -> planning."""
    pools = _question_kinds(scene)
    for caps in pools.values():
        rng.shuffle(caps)
    out: list[dict] = []
    while len(out) < n and any(pools.values()):
        for cap in CAPABILITIES:
            if pools[cap] and len(out) < n:
                out.append(pools[cap].pop()(scene, rng))
    if len(out) < n:
        raise ValueError(f"scene {scene['frame_token']} supports only {len(out)} questions, {n} requested")
    for q in out:
        if "letter" in q:
            short = f"{q['letter']}. {q['options']['ABCDEFG'.index(q['letter'])]}"
            q["answer"] = q["letter"]
        else:
            short = q["short"]
            q["answer"] = short
        q["drivekd_answer"] = f"Final: {short}\nSupport: {q['support'][0].upper()}{q['support'][1:]}"
        q["tag"] = 0 if "letter" in q else _OPEN_TAG[q["capability"]]
    return out


# ------------------------------------------------------------------------------------- writing


def _hex(rng: random.Random, n: int = 32) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _six_view_groups(groups: int, fraction: float) -> list[bool]:
    """Which groups are six-view: round(groups * fraction) (half up), spread evenly."""
    n_six = int(math.floor(groups * fraction + 0.5))
    return [(i + 1) * n_six // groups > i * n_six // groups for i in range(groups)]


def make_demo_data(
    out: str | Path,
    groups: int = 12,
    *,
    six_view_fraction: float = 0.5,
    questions_per_group: int = 4,
    seed: int = 42,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> dict[str, Any]:
    """Write a synthetic demo data set under `out` (see the module docstring); returns a summary.

    groups: number of image groups (scenes). six_view_fraction: share of six-camera groups, rounded
    half up. questions_per_group: 1..8 questions per group, cycling through the capabilities.
    seed: same seed -> byte-identical files. size: (width, height) of every image in pixels.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if not 0.0 <= six_view_fraction <= 1.0:
        raise ValueError(f"six_view_fraction must be in [0, 1], got {six_view_fraction}")
    if not 1 <= questions_per_group <= MAX_QUESTIONS_PER_GROUP:
        raise ValueError(f"questions_per_group must be in 1..{MAX_QUESTIONS_PER_GROUP}, got {questions_per_group}")
    w, h = size
    if w < 64 or h < 32:
        raise ValueError(f"size must be at least 64x32 pixels, got {w}x{h}")
    t0 = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    train: list[dict] = []
    bench: list[dict] = []
    scenes: list[dict] = []
    n_images = 0
    for g, six in enumerate(_six_view_groups(groups, six_view_fraction)):
        rng = random.Random(f"drivekd-demo-{seed}-{g}")
        scene = generate_scene(rng, six)
        scene["group"] = g
        scene["scene_token"] = _hex(rng)
        scene["frame_token"] = _hex(rng)
        cams = list(CAMERA_ORDER) if six else ["CAM_FRONT"]
        scene["images"] = {c: f"images/{scene['frame_token']}/{c}.png" for c in cams}
        (out / "images" / scene["frame_token"]).mkdir(exist_ok=True)
        layouts = {}
        for c in cams:
            img, layouts[c] = render_view(scene, c, size)
            img.save(out / scene["images"][c], format="PNG", optimize=False, compress_level=6)
            n_images += 1
        scene["views"] = layouts
        # Reference each object in the camera where it is most visible (and at least half visible).
        scene["by_id"] = {o["oid"]: o for o in scene["objects"]}
        scene["refs"] = {}
        for o in scene["objects"]:
            best = max(((lay["objects"][o["oid"]]["visible"], c) for c, lay in layouts.items()
                        if o["oid"] in lay["objects"] and lay["objects"][o["oid"]]["in_frame"]), default=None)
            if best and best[0] >= 0.5:
                scene["refs"][o["oid"]] = (best[1], layouts[best[1]]["objects"][o["oid"]]["centre"])
        front = layouts["CAM_FRONT"]["objects"]
        scene["front_pedestrians"] = sum(
            1 for o in scene["objects"]
            if o["kind"] == "pedestrian" and o["oid"] in front and front[o["oid"]]["in_frame"]
            and front[o["oid"]]["visible"] >= 0.5)
        questions = _make_questions(scene, rng, questions_per_group)
        for q in questions:
            images = [scene["images"][c] for c in cams]
            train.append({
                "messages": [
                    {"role": "user", "content": "<image>" * len(images) + q["question"]},
                    {"role": "assistant", "content": q["drivekd_answer"]},
                ],
                "images": images,
                "question_type": q["capability"],
            })
            bench.append({
                "scene_token": scene["scene_token"],
                "frame_token": scene["frame_token"],
                "question": q["question"],
                "answer": q["answer"],
                "tag": [q["tag"]],
                "question_type": q["bench_type"],
                "image_path": dict(scene["images"]),
            })
        del scene["by_id"]
        scene["refs"] = {k: {"camera": c, "centre": xy} for k, (c, xy) in scene["refs"].items()}
        scene["questions"] = questions
        scenes.append(scene)

    _write_json(out / "train.json", train)
    _write_json(out / "drivebench.json", bench)
    _write_json(out / "scenes.json", {"seed": seed, "size": [w, h], "scenes": scenes})
    counts = {c: sum(1 for r in train if r["question_type"] == c) for c in CAPABILITIES}
    return {
        "out": str(out),
        "groups": groups,
        "six_view_groups": sum(s["six_view"] for s in scenes),
        "images": n_images,
        "samples": len(train),
        "drivebench_records": len(bench),
        "capabilities": counts,
        "train_json": str(out / "train.json"),
        "drivebench_json": str(out / "drivebench.json"),
        "scenes_json": str(out / "scenes.json"),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def summary_line(summary: dict[str, Any]) -> str:
    c = summary["capabilities"]
    return (f"wrote {summary['groups']} groups ({summary['six_view_groups']} six-view), {summary['images']} images, "
            f"{summary['samples']} Drive-KD samples (perception {c['perception']}, reasoning {c['reasoning']}, "
            f"planning {c['planning']}) and {summary['drivebench_records']} DriveBench records to {summary['out']} "
            f"in {summary['seconds']:.2f} s")
