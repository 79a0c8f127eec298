"""The ctypes prototype table declares exactly the functions of include/qdirty.h, with
matching arity and pointer/integer return kinds."""

import ctypes
import errno
import os
import re
import unittest
from unittest import mock

from _util import qdirty  # (loads the library)
from qdirty import _ffi

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "include", "qdirty.h")

_DECL = re.compile(r"^(.*?[\s*])(qdirty_\w+)\((.*)\)$", re.S)


def header_prototypes():
    """name -> (return type, number of parameters) of every function in the header."""
    text = read_header()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"//.*", "", line).strip()
        if not line or line.startswith("#") or line in ('extern "C" {', "}"):
            continue
        lines.append(line)
    out = {}
    for decl in " ".join(lines).split(";"):
        decl = decl.strip()
        if decl.startswith("typedef"):
            continue
        m = _DECL.match(decl)
        if m:
            ret, name, params = m.group(1).strip(), m.group(2), m.group(3).strip()
            nparams = 0 if params in ("", "void") else params.count(",") + 1
            out[name] = (ret, nparams)
    return out


def read_header() -> str:
    with open(HEADER, encoding="utf-8") as f:
        return f.read()


class PrototypeTableTest(unittest.TestCase):
    def test_table_matches_header(self):
        header = header_prototypes()
        self.assertGreaterEqual(len(header), 38)
        self.assertEqual(set(_ffi.PROTOTYPES), set(header))

    def test_arity_and_return_kind(self):
        header = header_prototypes()
        for name, (ret, nparams) in header.items():
            restype, argtypes = _ffi.PROTOTYPES[name]
            with self.subTest(name=name):
                self.assertEqual(len(argtypes), nparams)
                if "*" in ret:
                    self.assertIn(
                        restype,
                        (ctypes.c_char_p, ctypes.c_void_p, _ffi.ImageP, _ffi.BitmapP, _ffi.IterP,
                         _ffi.TxnP),
                        "a pointer return must not be declared as an integer",
                    )
                elif ret == "void":
                    self.assertIsNone(restype)
                elif ret == "bool":
                    self.assertIs(restype, ctypes.c_bool)
                elif ret in ("int", "int64_t", "uint32_t", "uint64_t"):
                    expected = {
                        "int": ctypes.c_int,
                        "int64_t": ctypes.c_int64,
                        "uint32_t": ctypes.c_uint32,
                        "uint64_t": ctypes.c_uint64,
                    }[ret]
                    self.assertIs(restype, expected)
                else:
                    self.fail(f"unexpected return type {ret!r}")

    def test_every_function_is_declared_on_the_library(self):
        for name, (restype, argtypes) in _ffi.PROTOTYPES.items():
            fn = getattr(_ffi.lib, name)
            self.assertIs(fn.restype, restype)
            self.assertEqual(list(fn.argtypes), list(argtypes))

    def test_a_missing_function_fails_when_called_not_at_load(self):
        fake = "qdirty_no_such_function"
        with mock.patch.dict(_ffi.PROTOTYPES, {fake: (ctypes.c_int, [ctypes.c_int])}):
            lib = _ffi.load(_ffi.find_library())
        self.assertEqual(set(lib.qdirty_missing) - set(_ffi.lib.qdirty_missing), {fake})
        with self.assertRaises(qdirty.QdirtyError) as cm:
            getattr(lib, fake)(1)
        self.assertEqual(cm.exception.errno, errno.ENOSYS)
        self.assertIn(fake, cm.exception.message)
        self.assertIn(_ffi.find_library(), cm.exception.message)
        # The rest of that library works.
        self.assertTrue(lib.qdirty_version())

    def test_check_flags_match_header(self):
        text = read_header()
        for flag in ("QDIRTY_CHECK_BUSY", "QDIRTY_CHECK_RO", "QDIRTY_CHECK_INCONSISTENT",
                     "QDIRTY_CHECK_DEFAULT", "QDIRTY_CHECK_ALLOW_RO"):
            m = re.search(rf"#define {flag} (\d+)u", text)
            self.assertIsNotNone(m, flag)
            self.assertEqual(getattr(_ffi, flag), int(m.group(1)))

    def test_bitmap_info_layout_matches_header(self):
        text = read_header()
        m = re.search(r"typedef struct (?:qdirty_bitmap_info )?\{([^{}]*)\} qdirty_bitmap_info;", text, re.S)
        self.assertIsNotNone(m)
        fields = re.findall(r"^\s*([\w ]+?\**)\s*(\w+);", re.sub(r"//.*", "", m.group(1)), re.M)
        self.assertEqual([n for _, n in fields], [n for n, _ in _ffi.BitmapInfo._fields_])

    def test_extent_layout_matches_header(self):
        text = read_header()
        m = re.search(r"typedef struct (?:qdirty_extent )?\{([^{}]*)\} qdirty_extent;", text, re.S)
        self.assertIsNotNone(m, "qdirty_extent is not in the header")
        fields = re.findall(r"^\s*([\w ]+?\**)\s*(\w+);", re.sub(r"//.*", "", m.group(1)), re.M)
        self.assertEqual(fields, [("uint64_t", "offset"), ("uint64_t", "length")])
        self.assertEqual([n for n, _ in _ffi.Extent._fields_], ["offset", "length"])
        self.assertEqual(ctypes.sizeof(_ffi.Extent), 16)

    def test_soname_matches_header(self):
        m = re.search(r"#define QDIRTY_ABI_MAJOR (\d+)", read_header())
        self.assertIsNotNone(m, "QDIRTY_ABI_MAJOR is not in the header")
        self.assertEqual(_ffi.SONAME, f"libqdirty.so.{m.group(1)}")

    def test_flags_match_header(self):
        text = read_header()
        for flag in ("QDIRTY_OPEN_RDWR", "QDIRTY_OPEN_DURABLE", "QDIRTY_BITMAP_PERSISTENT", "QDIRTY_BITMAP_DISABLED",
                     "QDIRTY_BITMAP_AUTOLOAD"):
            m = re.search(rf"#define {flag} (\d+)u", text)
            self.assertIsNotNone(m, flag)
            self.assertEqual(getattr(_ffi, flag), int(m.group(1)))
            self.assertEqual(getattr(qdirty, flag), int(m.group(1)))


if __name__ == "__main__":
    unittest.main()
