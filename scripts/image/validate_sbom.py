"""Validates CycloneDX JSON SBOMs against the CycloneDX schema of their specVersion, offline
(the schemas ship with cyclonedx-python-lib, pinned in tests/kmock/requirements.txt), with
no additional properties allowed. Prints `valid FILE` or the first error; exits 1 on any.

    /opt/portico-kmock/bin/python validate_sbom.py FILE...
"""

import json
import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator


def main() -> int:
    failed = 0
    for path in sys.argv[1:]:
        with open(path, encoding='utf-8') as f:
            text = f.read()
        version = SchemaVersion.from_version(json.loads(text)['specVersion'])
        error = JsonStrictValidator(version).validate_str(text)
        if error is None:
            print(f'valid {path} (CycloneDX {version.to_version()})')
        else:
            failed += 1
            data = error.data
            where = '/'.join(str(p) for p in getattr(data, 'absolute_path', []))
            message = getattr(data, 'message', str(data)).splitlines()[0]
            print(f'invalid {path}: at /{where}: {message}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
