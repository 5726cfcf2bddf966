"""The CycloneDX 1.5 SBOM of Portico's container image: the Debian packages of its root
file system (from its dpkg status, as pkg:deb purls), the operating system, and the
binary with every crate of the binary's own SBOM (cargo-cyclonedx, from Cargo.lock).

    python3 sbom.py --rootfs DIR --binary-sbom FILE --name localhost/portico \
        --version 0.1.0 --digest sha256:... --out portico-image.cdx.json
"""

import argparse
import datetime
import json
import os
import urllib.parse
import uuid


def packages(status_file: str) -> list[dict]:
    """The installed packages of a dpkg status file, as dicts of their fields."""
    out = []
    with open(status_file, encoding='utf-8') as f:
        for para in f.read().split('\n\n'):
            fields, last = {}, None
            for line in para.splitlines():
                if line.startswith((' ', '\t')) and last:
                    fields[last] += '\n' + line.strip()
                elif ':' in line:
                    last, _, value = line.partition(':')
                    fields[last] = value.strip()
            if fields.get('Status', '').endswith(' installed'):
                out.append(fields)
    return sorted(out, key=lambda p: p['Package'])


def os_release(rootfs: str) -> dict:
    fields = {}
    for path in ('etc/os-release', 'usr/lib/os-release'):
        try:
            with open(os.path.join(rootfs, path), encoding='utf-8') as f:
                for line in f:
                    k, _, v = line.strip().partition('=')
                    if k:
                        fields[k] = v.strip('"')
            return fields
        except FileNotFoundError:
            continue
    raise SystemExit(f'no os-release in {rootfs}')


def deb_purl(pkg: dict, distro: str) -> str:
    q = urllib.parse.quote
    name, version, arch = pkg['Package'], pkg['Version'], pkg['Architecture']
    purl = f'pkg:deb/debian/{q(name, safe="")}@{q(version, safe="")}?arch={arch}&distro={distro}'
    if 'Source' in pkg:
        source = pkg['Source'].split(' ')[0]
        if source != name:
            purl += '&upstream=' + q(source, safe='')
    return purl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--rootfs', required=True)
    p.add_argument('--binary-sbom', required=True)
    p.add_argument('--name', required=True)
    p.add_argument('--version', required=True)
    p.add_argument('--digest', required=True)
    p.add_argument('--out', required=True)
    a = p.parse_args()

    with open(a.binary_sbom, encoding='utf-8') as f:
        binary = json.load(f)
    osr = os_release(a.rootfs)
    distro = f'{osr["ID"]}-{osr["VERSION_ID"]}'
    timestamp = datetime.datetime.fromtimestamp(
        int(os.environ.get('SOURCE_DATE_EPOCH', '0')), tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')

    image_ref = f'pkg:oci/{a.name.rsplit("/", 1)[-1]}@{urllib.parse.quote(a.digest, safe="")}' \
        f'?repository_url={urllib.parse.quote(a.name, safe="")}&tag={a.version}'
    os_ref = f'os:{distro}'
    components = [{
        'type': 'operating-system', 'bom-ref': os_ref, 'name': osr['ID'],
        'version': osr['VERSION_ID'], 'description': osr.get('PRETTY_NAME', ''),
    }]
    deb_refs = []
    for pkg in packages(os.path.join(a.rootfs, 'var/lib/dpkg/status')):
        purl = deb_purl(pkg, distro)
        deb_refs.append(purl)
        c = {'type': 'library', 'bom-ref': purl, 'name': pkg['Package'],
             'version': pkg['Version'], 'purl': purl}
        if pkg.get('Maintainer'):
            c['supplier'] = {'name': pkg['Maintainer']}
        if pkg.get('Description'):
            c['description'] = pkg['Description'].split('\n')[0]
        components.append(c)
    # The binary as its own SBOM describes it (with its targets), then its crates.
    app = dict(binary['metadata']['component'])
    app['type'] = 'application'
    components.append(app)
    components.extend(binary.get('components', []))

    dependencies = [{'ref': image_ref, 'dependsOn': [os_ref, *deb_refs, app['bom-ref']]}]
    dependencies.extend(binary.get('dependencies', []))

    bom = {
        'bomFormat': 'CycloneDX',
        'specVersion': '1.5',
        'serialNumber': f'urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, image_ref)}',
        'version': 1,
        'metadata': {
            'timestamp': timestamp,
            'tools': {'components': [{'type': 'application', 'name': 'portico scripts/image/sbom.py'}]},
            'component': {
                'type': 'container', 'bom-ref': image_ref, 'name': a.name,
                'version': a.version, 'purl': image_ref,
                'hashes': [{'alg': 'SHA-256', 'content': a.digest.split(':', 1)[1]}],
            },
        },
        'components': components,
        'dependencies': dependencies,
    }
    with open(a.out, 'w', encoding='utf-8') as f:
        json.dump(bom, f, indent=2)
        f.write('\n')
    print(f'{len(deb_refs)} Debian packages, {len(binary.get("components", []))} crates')


if __name__ == '__main__':
    main()
