"""examples/incremental_backup.py runs and verifies itself with qemu-img."""

import os
import subprocess
import sys
import unittest

from _util import TempDirTest, require_tool

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "incremental_backup.py")


class ExampleTest(TempDirTest):
    def test_incremental_backup(self):
        for tool in ("qemu-img", "qemu-io"):
            require_tool(self, tool)
        r = subprocess.run([sys.executable, EXAMPLE, self.dir], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("Images are identical.", r.stdout)
        self.assertIn("262144 bytes copied of 67108864", r.stdout)


if __name__ == "__main__":
    unittest.main()
