"""Validates custom resources against the openAPIV3Schema of their CRD, as kube-apiserver
would before admission, and strictly: an object field the schema does not list is an error
(the API server would prune it silently). CEL rules (x-kubernetes-validations) are not
evaluated.

    python validate_custom_resources.py CRD_DIR FILE...
Prints `valid <Kind>/<name>` for each object of a kind of CRD_DIR's CRDs (others are left
to other checks), the errors otherwise; exits 1 on any error.
"""

import copy
import glob
import os
import sys

import jsonschema
import yaml


def strict(schema: dict) -> dict:
    schema = copy.deepcopy(schema)
    # What every object has, which generated CRD schemas leave to the API server.
    props = schema.setdefault('properties', {})
    props.setdefault('apiVersion', {'type': 'string'})
    props.setdefault('kind', {'type': 'string'})
    props.setdefault('metadata', {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True})

    def walk(s):
        if not isinstance(s, dict):
            return
        if 'properties' in s and not s.get('x-kubernetes-preserve-unknown-fields') \
                and 'additionalProperties' not in s:
            s['additionalProperties'] = False
        for v in s.get('properties', {}).values():
            walk(v)
        for key in ('items', 'additionalProperties'):
            walk(s.get(key))
        for key in ('allOf', 'anyOf', 'oneOf'):
            for v in s.get(key, []):
                walk(v)

    walk(schema)
    return schema


def main() -> int:
    crd_dir, files = sys.argv[1], sys.argv[2:]
    schemas = {}
    for path in sorted(glob.glob(os.path.join(crd_dir, '*.yaml'))):
        with open(path, encoding='utf-8') as f:
            crd = yaml.safe_load(f)
        spec = crd['spec']
        for v in spec['versions']:
            key = (f"{spec['group']}/{v['name']}", spec['names']['kind'])
            schemas[key] = strict(v['schema']['openAPIV3Schema'])
    failed = 0
    for path in files:
        with open(path, encoding='utf-8') as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            schema = schemas.get((doc.get('apiVersion'), doc.get('kind')))
            if schema is None:
                continue
            what = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
            for e in errors:
                failed += 1
                where = '.'.join(str(p) for p in e.absolute_path)
                print(f'invalid {path}: {what}: at {where}: {e.message}')
            if not errors:
                print(f'valid {what}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
