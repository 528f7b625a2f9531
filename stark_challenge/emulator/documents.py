"""The files Stark Bank renders: PDF receipts and the invoice's QR code image.

Minimal but valid documents, made from the entity's JSON: `pdf` writes a one-page PDF
listing the given lines (a real cross-reference table, so any reader opens it); `qr_png`
writes a PNG of a QR-code-sized grid of ``size`` pixels per module, its dark modules
drawn from a hash of the text. It has the right size and format but is NOT a scannable
QR code: nothing here reads it back, and a real encoder is not worth its weight in a
stand-in. Pure functions, no state.
"""

import hashlib
import struct
import zlib

__all__ = ["pdf", "receipt", "qr_png"]

# A BR code of ~150 characters needs a version 7 QR code, 45 modules wide; the standard
# quiet zone is 4 modules each side.
_MODULES = 45
_QUIET = 4


def _pdf_text(text):
    return text.encode("latin-1", errors="replace").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def pdf(title, lines):
    """Return the bytes of a one-page A4 PDF showing title and then each of lines (str)."""
    stream = [b"BT /F1 16 Tf 50 790 Td (" + _pdf_text(title) + b") Tj /F1 10 Tf"]
    for line in lines:
        stream.append(b"0 -16 Td (" + _pdf_text(line) + b") Tj")
    stream.append(b"ET")
    content = b"\n".join(stream)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 4 0 R >> >> "
        b"/Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def receipt(title, entity):
    """Return a PDF receipt for an entity (API JSON): title, then one line per field, nested ones flattened."""
    lines = []

    def add(prefix, value):
        if isinstance(value, dict):
            for key in sorted(value):
                add(prefix + key + ".", value[key])
        else:
            lines.append("%s %s" % (prefix.rstrip(".") + ":", value))

    add("", entity)
    lines.append("Issued by the stark_challenge emulator, a local stand-in for Stark Bank: not a real receipt.")
    return pdf(title, lines)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def qr_png(text, size=7):
    """Return the bytes of a grayscale PNG, (45 + 8) * size pixels square, patterned from text."""
    bits = []
    seed = text.encode("utf-8")
    while len(bits) < _MODULES * _MODULES:
        seed = hashlib.sha256(seed).digest()
        bits.extend((byte >> shift) & 1 for byte in seed for shift in range(8))
    width = (_MODULES + 2 * _QUIET) * size
    rows = []
    for module_row in range(_MODULES + 2 * _QUIET):
        pixels = bytearray()
        for module_column in range(_MODULES + 2 * _QUIET):
            r, c = module_row - _QUIET, module_column - _QUIET
            dark = 0 <= r < _MODULES and 0 <= c < _MODULES and bits[r * _MODULES + c]
            pixels += (b"\x00" if dark else b"\xff") * size
        rows.extend([b"\x00" + bytes(pixels)] * size)  # filter type 0 per scanline
    header = struct.pack(">IIBBBBB", width, width, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
            + _chunk(b"IEND", b""))
