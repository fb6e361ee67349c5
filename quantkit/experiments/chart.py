"""A small scatter chart written as PNG with numpy and zlib only (no matplotlib).

    scatter_png(path, series, title="...", xlabel="file size (MB)", ylabel="KLD")

``series``: list of Series(label, points [(x, y, text)], color, marker, line).
Text uses a built-in 5x7 bitmap font (upper-case letters, digits, a few signs).
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# 5x7 glyphs, each row a 5-bit int (MSB = leftmost pixel).
_FONT: dict[str, tuple[int, ...]] = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), "_": (0, 0, 0, 0, 0, 0, 31),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "/": (1, 1, 2, 4, 8, 16, 16),
    "=": (0, 0, 31, 0, 31, 0, 0), "%": (24, 25, 2, 4, 8, 19, 3), "x": (0, 17, 10, 4, 10, 17, 0),
    "[": (14, 8, 8, 8, 8, 8, 14), "]": (14, 2, 2, 2, 2, 2, 14), "'": (4, 4, 8, 0, 0, 0, 0),
}

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = (225, 225, 225)


@dataclass
class Series:
    label: str
    points: list[tuple[float, float, str]] = field(default_factory=list)  # (x, y, point label)
    color: tuple[int, int, int] = (31, 119, 180)
    marker: str = "o"  # "o" disc, "s" square
    line: bool = False  # join the points in order


class Canvas:
    def __init__(self, w: int, h: int):
        self.img = np.full((h, w, 3), 255, dtype=np.uint8)
        self.w, self.h = w, h

    def rect(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        x0, x1 = sorted((max(0, x0), min(self.w, x1)))
        y0, y1 = sorted((max(0, y0), min(self.h, y1)))
        if x1 > x0 and y1 > y0:
            self.img[y0:y1, x0:x1] = c

    def line(self, x0: float, y0: float, x1: float, y1: float, c, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.rint(np.linspace(x0, x1, n)).astype(int)
        ys = np.rint(np.linspace(y0, y1, n)).astype(int)
        r = width // 2
        for dx in range(-r, width - r):
            for dy in range(-r, width - r):
                xx, yy = xs + dx, ys + dy
                ok = (xx >= 0) & (xx < self.w) & (yy >= 0) & (yy < self.h)
                self.img[yy[ok], xx[ok]] = c

    def disc(self, x: float, y: float, r: int, c) -> None:
        yy, xx = np.ogrid[: self.h, : self.w]
        self.img[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = c

    def text(self, x: int, y: int, s: str, c=BLACK, scale: int = 1, anchor: str = "l") -> None:
        """Draw ``s`` with its top at y; anchor 'l' left, 'c' centre, 'r' right at x."""
        width = text_width(s, scale)
        if anchor == "c":
            x -= width // 2
        elif anchor == "r":
            x -= width
        for ch in s:
            g = _FONT.get(ch, _FONT.get(ch.upper(), _FONT[" "]))
            for row, bits in enumerate(g):
                for col in range(5):
                    if bits >> (4 - col) & 1:
                        self.rect(x + col * scale, y + row * scale, x + (col + 1) * scale, y + (row + 1) * scale, c)
            x += 6 * scale

    def vtext(self, x: int, y: int, s: str, c=BLACK, scale: int = 1) -> None:
        """Text rotated 90 degrees counter-clockwise, centred vertically on y."""
        tmp = Canvas(text_width(s, scale) + 2, 8 * scale)
        tmp.text(1, 0, s, c, scale)
        rot = np.rot90(tmp.img)
        h, w = rot.shape[:2]
        y0 = y - h // 2
        mask = (rot != 255).any(axis=2)
        sub = self.img[max(0, y0):y0 + h, x:x + w]
        m = mask[: sub.shape[0], : sub.shape[1]]
        sub[m] = rot[: sub.shape[0], : sub.shape[1]][m]


def text_width(s: str, scale: int = 1) -> int:
    return max(0, 6 * len(s) - 1) * scale


def write_png(path: "str | os.PathLike", img: np.ndarray) -> None:
    """RGB uint8 (h, w, 3) -> PNG file (written to a temp file, then renamed)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(png)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_png(path: "str | os.PathLike") -> np.ndarray:
    """Decode what write_png writes (8-bit RGB, filter 0); used by tests."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc, f"bad CRC in {tag!r}"
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * 3)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-12 * abs(hi):
        out.append(round(v, 12))
        v += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.4g}"
    return f"{v:.3g}"


def scatter_png(path, series: list[Series], title: str = "", xlabel: str = "", ylabel: str = "",
                width: int = 900, height: int = 600) -> None:
    pts = [(x, y) for s in series for x, y, _ in s.points if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        raise ValueError("nothing to plot")
    xs, ys = zip(*pts)
    xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
    padx = (xhi - xlo) * 0.08 or max(abs(xhi) * 0.05, 1e-3)
    pady = (yhi - ylo) * 0.08 or max(abs(yhi) * 0.05, 1e-3)
    xlo, xhi, ylo, yhi = xlo - padx, xhi + padx, ylo - pady, yhi + pady
    c = Canvas(width, height)
    L, R, T, B = 80, width - 220, 40, height - 60  # plot area

    def px(x: float) -> float:
        return L + (x - xlo) / (xhi - xlo) * (R - L)

    def py(y: float) -> float:
        return B - (y - ylo) / (yhi - ylo) * (B - T)

    for t in _nice_ticks(xlo, xhi):
        X = px(t)
        c.line(X, T, X, B, GRID)
        c.line(X, B, X, B + 5, BLACK)
        c.text(int(X), B + 9, _fmt(t), anchor="c")
    for t in _nice_ticks(ylo, yhi):
        Y = py(t)
        c.line(L, Y, R, Y, GRID)
        c.line(L - 5, Y, L, Y, BLACK)
        c.text(L - 8, int(Y) - 3, _fmt(t), anchor="r")
    c.line(L, T, L, B, BLACK)
    c.line(L, B, R, B, BLACK)
    c.line(R, T, R, B, BLACK)
    c.line(L, T, R, T, BLACK)
    if title:
        c.text((L + R) // 2, 12, title, scale=2, anchor="c")
    if xlabel:
        c.text((L + R) // 2, B + 28, xlabel, anchor="c")
    if ylabel:
        c.vtext(12, (T + B) // 2, ylabel)

    for s in series:
        P = [(px(x), py(y), lab) for x, y, lab in s.points if math.isfinite(x) and math.isfinite(y)]
        if s.line:
            for (x0, y0, _), (x1, y1, _) in zip(P, P[1:]):
                c.line(x0, y0, x1, y1, s.color, width=2)
        for X, Y, lab in P:
            if s.marker == "s":
                c.rect(int(X) - 4, int(Y) - 4, int(X) + 5, int(Y) + 5, s.color)
            else:
                c.disc(X, Y, 4, s.color)
            if lab:
                c.text(int(X) + 7, int(Y) - 10, lab, s.color)
    # legend
    ly = T + 5
    for s in series:
        if s.marker == "s":
            c.rect(R + 15, ly, R + 24, ly + 9, s.color)
        else:
            c.disc(R + 19, ly + 4, 4, s.color)
        c.text(R + 30, ly + 1, s.label[:30])
        ly += 18
    write_png(path, c.img)
