"""examples/incremental_backup.py runs and verifies itself with qemu-img."""

import os
import subprocess
import sys
import unittest

from _util import TempDirTest, require_tool

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "..", "examples", "incremental_backup.py")
PACKAGE_DIR = os.path.join(HERE, "..")


class ExampleTest(TempDirTest):
    def test_incremental_backup(self):
        for tool in ("qemu-img", "qemu-io"):
            require_tool(self, tool)
        # The example imports the installed package; here, the one of this source tree.
        env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
        r = subprocess.run([sys.executable, EXAMPLE, self.dir], capture_output=True, text=True, env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("Images are identical.", r.stdout)
        self.assertIn("262144 bytes copied of 67108864", r.stdout)


if __name__ == "__main__":
    unittest.main()
