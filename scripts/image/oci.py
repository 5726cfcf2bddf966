"""Writes Portico's container image as an OCI image layout in a tar archive (what
`podman load` and `skopeo copy oci-archive:` read), from a root file system and the
binary, without a registry, a daemon or a base image.

Two layers: the Debian root (scripts/image.sh makes it with mmdebstrap) less what only
building it needed, and Portico's own files (the binary, its SBOM, /etc/passwd with root
and nonroot). Reproducible: entries sorted, owned by root, dated SOURCE_DATE_EPOCH, gzip
without a timestamp.

    python3 oci.py --rootfs DIR --binary FILE --binary-sbom FILE --name localhost/portico \
        --version 0.1.0 --out portico.oci.tar
Prints the manifest's digest.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import tarfile

# Left out of the root layer: apt and mmdebstrap's own files, and what the runtime provides.
EXCLUDE = ('etc/apt', 'var/cache/apt', 'var/lib/apt', 'var/log', 'etc/dpkg/dpkg.cfg.d/99mmdebstrap',
           'etc/hostname', 'etc/resolv.conf', 'etc/fstab', 'etc/passwd', 'etc/group')
EXCLUDE_CONTENTS = ('dev', 'proc', 'sys', 'run', 'tmp')

PASSWD = 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n'
GROUP = 'root:x:0:\nnonroot:x:65532:\n'


def epoch() -> int:
    return int(os.environ.get('SOURCE_DATE_EPOCH', '0'))


def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = 'root'
    info.mtime = epoch()
    info.pax_headers = {}
    return info


def excluded(rel: str) -> bool:
    if any(rel == e or rel.startswith(e + '/') for e in EXCLUDE):
        return True
    return any(rel.startswith(e + '/') for e in EXCLUDE_CONTENTS)


def root_layer(rootfs: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode='w', format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for top, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in dirs + sorted(files):
                paths.append(os.path.join(top, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, rootfs)):
            rel = os.path.relpath(path, rootfs)
            if not excluded(rel):
                tar.add(path, arcname=rel, recursive=False, filter=normalize)
    return out.getvalue()


def file_entry(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = normalize(tarfile.TarInfo(name))
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def dir_entry(tar: tarfile.TarFile, name: str) -> None:
    info = normalize(tarfile.TarInfo(name))
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def app_layer(binary: str, sbom: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for d in ('etc', 'usr', 'usr/local', 'usr/local/bin', 'usr/share', 'usr/share/doc',
                  'usr/share/doc/portico'):
            dir_entry(tar, d)
        file_entry(tar, 'etc/group', GROUP.encode(), 0o644)
        file_entry(tar, 'etc/passwd', PASSWD.encode(), 0o644)
        with open(binary, 'rb') as f:
            file_entry(tar, 'usr/local/bin/portico', f.read(), 0o755)
        with open(sbom, 'rb') as f:
            file_entry(tar, 'usr/share/doc/portico/portico.cdx.json', f.read(), 0o644)
    return out.getvalue()


def sha256(data: bytes) -> str:
    return 'sha256:' + hashlib.sha256(data).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--rootfs', required=True)
    p.add_argument('--binary', required=True)
    p.add_argument('--binary-sbom', required=True)
    p.add_argument('--name', required=True)
    p.add_argument('--version', required=True)
    p.add_argument('--out', required=True)
    a = p.parse_args()

    created = datetime.datetime.fromtimestamp(epoch(), tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')
    blobs = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = sha256(data)
        blobs[digest] = data
        return {'mediaType': media_type, 'digest': digest, 'size': len(data)}

    layers, diff_ids = [], []
    for raw in (root_layer(a.rootfs), app_layer(a.binary, a.binary_sbom)):
        diff_ids.append(sha256(raw))
        zipped = io.BytesIO()
        with gzip.GzipFile(fileobj=zipped, mode='wb', mtime=0) as gz:
            gz.write(raw)
        layers.append(blob(zipped.getvalue(), 'application/vnd.oci.image.layer.v1.tar+gzip'))
    labels = {
        'org.opencontainers.image.title': 'portico',
        'org.opencontainers.image.version': a.version,
        'org.opencontainers.image.licenses': 'Apache-2.0',
        'org.opencontainers.image.description':
            'Portico: LoadBalancer IPAM, BGP and an XDP balancer for bare-metal Kubernetes',
    }
    config = {
        'created': created,
        'architecture': 'amd64',
        'os': 'linux',
        'config': {
            'User': '65532:65532',
            'Entrypoint': ['/usr/local/bin/portico'],
            'Env': ['PATH=/usr/local/bin:/usr/bin:/bin'],
            'Labels': labels,
        },
        'rootfs': {'type': 'layers', 'diff_ids': diff_ids},
        'history': [
            {'created': created, 'created_by': 'mmdebstrap --variant=extract (scripts/image.sh)'},
            {'created': created, 'created_by': 'scripts/image/oci.py: portico, its SBOM, /etc/passwd'},
        ],
    }
    config_desc = blob(json.dumps(config, sort_keys=True).encode(),
                       'application/vnd.oci.image.config.v1+json')
    manifest = {
        'schemaVersion': 2,
        'mediaType': 'application/vnd.oci.image.manifest.v1+json',
        'config': config_desc,
        'layers': layers,
        'annotations': {'org.opencontainers.image.created': created, **labels},
    }
    manifest_desc = blob(json.dumps(manifest, sort_keys=True).encode(),
                         'application/vnd.oci.image.manifest.v1+json')
    manifest_desc['annotations'] = {'org.opencontainers.image.ref.name': f'{a.name}:{a.version}'}
    index = {'schemaVersion': 2, 'mediaType': 'application/vnd.oci.image.index.v1+json',
             'manifests': [manifest_desc]}

    tmp = a.out + '.tmp'
    with open(tmp, 'wb') as f, tarfile.open(fileobj=f, mode='w', format=tarfile.PAX_FORMAT) as tar:
        dir_entry(tar, 'blobs')
        dir_entry(tar, 'blobs/sha256')
        for digest in sorted(blobs):
            file_entry(tar, 'blobs/sha256/' + digest.split(':')[1], blobs[digest], 0o644)
        file_entry(tar, 'index.json', json.dumps(index, sort_keys=True).encode(), 0o644)
        file_entry(tar, 'oci-layout', b'{"imageLayoutVersion":"1.0.0"}', 0o644)
    os.replace(tmp, a.out)
    print(manifest_desc['digest'])


if __name__ == '__main__':
    main()
