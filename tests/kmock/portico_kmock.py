"""kmock 0.8 made close enough to a kube-apiserver for Portico's end-to-end tests.

kmock's KubernetesEmulator stores objects and serves list, watch, get, create, patch and
delete, but (measured) stores objects without resourceVersion, uid or creationTimestamp,
lists without kind and with the resourceVersion "...", applies every patch as a merge (a
write to /status can change spec), sends MODIFIED for patches that change nothing,
replays every object on every watch, answers PUT with 404 and never answers 409. This
extension adds, and only adds:

- resourceVersion (one counter for the whole store), uid, creationTimestamp and
  generation (bumped when anything but metadata and status changes) on every write;
- lists with kind `<Kind>List`, apiVersion and the store's resourceVersion; a watch from a
  resourceVersion replays only objects written after it; `fieldSelector=metadata.name=`;
- PATCH on `/status` changes only `status`; PATCH on the object never changes `status`
  (for the kinds with a status subresource); a patch that changes nothing sends no event
  and keeps the resourceVersion; server-side apply (apply-patch content type) creates a
  missing object, as it does on a real server;
- PUT replaces the object, with optimistic concurrency: a resourceVersion in the body
  that is not the stored one is answered 409 Conflict (what leader election relies on).

Still not a real API server: no field ownership (apply is a merge; lists in a patch
replace the stored list), no validation against the CRD schemas, no admission, no
garbage collection of owned objects.

With `--record FILE` it also appends one JSON line per request to FILE: who sent it (the
bearer token, which the RBAC test sets to the ServiceAccount's user name), the
authorization verb (get, list, watch, create, update, patch, delete, deletecollection),
apiGroup, resource, subresource, namespace and name, as kube-apiserver's authorizer would
see them. A server-side apply that creates its object is recorded as a patch and a create
(kube-apiserver checks both).

Run: `python portico_kmock.py [--port N] [--record FILE]`; prints `listening on PORT` once
serving.
"""

import argparse
import asyncio
import copy
import datetime
import json
import re
import uuid

import aiohttp.web
import kmock
from kmock._internal import dicts, enums, k8s

# Kinds whose status is a subresource: writes to the object leave status alone.
STATUS_SUBRESOURCE = {
    'services', 'nodes', 'addresspools', 'bgppeers', 'porticonodes',
    'gatewayclasses', 'gateways', 'tcproutes', 'udproutes', 'httproutes',
}

# Discovery of the kinds the tests use: (group, version, plural, kind, namespaced).
RESOURCES = [
    ('', 'v1', 'services', 'Service', True),
    ('', 'v1', 'namespaces', 'Namespace', False),
    ('', 'v1', 'nodes', 'Node', False),
    ('', 'v1', 'secrets', 'Secret', True),
    ('', 'v1', 'events', 'Event', True),
    ('discovery.k8s.io', 'v1', 'endpointslices', 'EndpointSlice', True),
    ('events.k8s.io', 'v1', 'events', 'Event', True),
    ('coordination.k8s.io', 'v1', 'leases', 'Lease', True),
    ('portico.io', 'v1alpha1', 'addresspools', 'AddressPool', False),
    ('portico.io', 'v1alpha1', 'bgppeers', 'BGPPeer', False),
    ('portico.io', 'v1alpha1', 'bgpadvertisements', 'BGPAdvertisement', False),
    ('portico.io', 'v1alpha1', 'porticonodes', 'PorticoNode', False),
    ('gateway.networking.k8s.io', 'v1', 'gatewayclasses', 'GatewayClass', False),
    ('gateway.networking.k8s.io', 'v1', 'gateways', 'Gateway', True),
    ('gateway.networking.k8s.io', 'v1', 'referencegrants', 'ReferenceGrant', True),
    ('gateway.networking.k8s.io', 'v1alpha2', 'tcproutes', 'TCPRoute', True),
    ('gateway.networking.k8s.io', 'v1alpha2', 'udproutes', 'UDPRoute', True),
]

KINDS = {(g, v, p): k for g, v, p, k, _ in RESOURCES}


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def status_error(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({
        'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure',
        'code': code, 'reason': reason, 'message': message,
    }, status=code)


def rv_of(obj) -> int:
    try:
        return int(obj.get('metadata', {}).get('resourceVersion', '0'))
    except ValueError:
        return 0


def request_attributes(method: str, path: str, query) -> dict:
    """What kube-apiserver's authorizer sees of a request (its RequestInfo)."""
    parts = [p for p in path.split('/') if p]
    if parts[:1] == ['api'] and len(parts) >= 2:
        group, rest = '', parts[2:]
    elif parts[:1] == ['apis'] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return {'nonResourcePath': path, 'verb': method.lower()}
    namespace = None
    if len(rest) >= 3 and rest[0] == 'namespaces':
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] if rest else ''
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if resource == 'namespaces' and name is not None:
        namespace = name
    verb = {
        'GET': 'get' if name else 'list',
        'POST': 'create',
        'PUT': 'update',
        'PATCH': 'patch',
        'DELETE': 'delete' if name else 'deletecollection',
    }.get(method, method.lower())
    if method == 'GET' and query.get('watch') in ('true', '1'):
        verb = 'watch'
    return {'verb': verb, 'apiGroup': group, 'resource': resource, 'subresource': subresource,
            'namespace': namespace, 'name': name,
            'fieldSelector': query.get('fieldSelector') or None}


def spec_part(obj) -> dict:
    return {k: v for k, v in obj.items() if k not in ('metadata', 'status')}


class PorticoEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus what a controller needs from an API server (module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 0
        for group, version, plural, kind, namespaced in RESOURCES:
            gv = f'{group}/{version}' if group else version
            self.resources[f'{gv}/{plural}'] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced,
                verbs={'list', 'watch', 'get', 'create', 'update', 'patch', 'delete'},
                subresources={'status'} if plural in STATUS_SUBRESOURCE else set(),
            )

    async def _render_error(self, exc):
        # Kubernetes' reasons, which clients match on (kube-rs: NotFound, AlreadyExists).
        if isinstance(exc, k8s.KubernetesError):
            reason = {404: 'NotFound', 409: 'AlreadyExists'}.get(exc.status, 'InternalError')
            return status_error(exc.status, reason, exc.message or reason)
        return await super()._render_error(exc)

    record_to = None  # a file object, with --record

    def _record(self, raw_request, verb=None) -> None:
        if self.record_to is None:
            return
        auth = raw_request.headers.get('Authorization', '')
        entry = {'user': auth.removeprefix('Bearer ').strip() or None}
        entry.update(request_attributes(raw_request.method, raw_request.path, raw_request.query))
        if verb is not None:
            entry['verb'] = verb
        self.record_to.write(json.dumps(entry) + '\n')
        self.record_to.flush()

    async def __call__(self, raw_request):
        # Recorded before it is served (a watch may never end); a PATCH after, when its
        # status shows whether server-side apply created the object.
        if raw_request.method != 'PATCH':
            self._record(raw_request)
        response = await self._serve(raw_request)
        if raw_request.method == 'PATCH':
            self._record(raw_request)
            if getattr(response, 'status', None) == 201:
                self._record(raw_request, verb='create')
        return response

    async def _serve(self, raw_request):
        # kmock 0.8 cannot parse /api/v1/namespaces (it takes "namespaces" for the start of
        # a namespaced path): serve the Namespace kind here, from a plain dict, without
        # watch events (the tests create no Namespaces).
        if re.fullmatch(r'/api/v1/namespaces(/[^/]+)?', raw_request.path):
            return await self._namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _namespaces(self, raw_request):
        await raw_request.read()
        if not hasattr(self, '_namespace_store'):
            self._namespace_store = {}
        name = raw_request.path.rstrip('/').split('/')[-1]
        name = None if name == 'namespaces' else name
        if raw_request.method == 'GET' and raw_request.query.get('watch') == 'true':
            response = aiohttp.web.StreamResponse()
            await response.prepare(raw_request)
            await asyncio.sleep(3600)
            return response
        if raw_request.method == 'GET' and name is None:
            return aiohttp.web.json_response({
                'apiVersion': 'v1', 'kind': 'NamespaceList',
                'metadata': {'resourceVersion': str(self._rv)},
                'items': list(self._namespace_store.values()),
            })
        if raw_request.method == 'GET':
            if name in self._namespace_store:
                return aiohttp.web.json_response(self._namespace_store[name])
            return status_error(404, 'NotFound', f'namespace {name} not found')
        if raw_request.method == 'POST':
            obj = json.loads(await raw_request.text())
            meta = obj.setdefault('metadata', {})
            meta.update(resourceVersion=self._next_rv(), uid=str(uuid.uuid4()),
                        creationTimestamp=now())
            self._namespace_store[meta['name']] = obj
            return aiohttp.web.json_response(obj, status=201)
        return status_error(405, 'MethodNotAllowed', 'not served by the emulator')

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _key(self, request):
        return (request.resource, request.namespace, request.name)

    def _stored(self, key):
        obj = dict(self._objects.items()).get(key)
        return None if obj is None or obj.deleted else obj

    async def _handle(self, request):
        if request.resource is None:
            return await super()._handle(request)
        if request.method == 'PUT' and request.name is not None:
            return await self._replace(request)
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault('metadata', {})
            meta['resourceVersion'] = self._next_rv()
            meta.setdefault('uid', str(uuid.uuid4()))
            meta.setdefault('creationTimestamp', now())
            meta.setdefault('generation', 1)
            if request.namespace and 'namespace' not in meta:
                meta['namespace'] = request.namespace
        if request.action == enums.action.UPDATE and request.name is not None:
            return await self._patch(request)
        return await super()._handle(request)

    async def _patch(self, request):
        key = self._key(request)
        content_type = request.headers.get('Content-Type', '')
        data = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            obj = self._stored(key)
            if obj is None:
                if 'apply-patch' not in content_type or request.subresource:
                    return status_error(404, 'NotFound', f'{request.name} not found')
                new = copy.deepcopy(data)
                meta = new.setdefault('metadata', {})
                meta.update(resourceVersion=self._next_rv(), uid=str(uuid.uuid4()),
                            creationTimestamp=now(), generation=1)
                if request.namespace:
                    meta['namespace'] = request.namespace
                new.pop('status', None)
                self._objects[key] = new
                raw = self._objects[key].raw
                await self._buses[request.resource].put({'type': 'ADDED', 'object': raw})
                return aiohttp.web.json_response(raw, status=201)
            if request.subresource == 'status':
                changes = {'status': data.get('status')} if 'status' in data else {}
            elif request.subresource:
                return status_error(404, 'NotFound', f'no subresource {request.subresource}')
            else:
                changes = {k: v for k, v in data.items() if k not in ('apiVersion', 'kind')}
                if request.resource.plural in STATUS_SUBRESOURCE:
                    changes.pop('status', None)
                meta = dict(changes.get('metadata') or {})
                for k in ('resourceVersion', 'uid', 'creationTimestamp', 'generation',
                          'managedFields'):
                    meta.pop(k, None)
                if meta:
                    changes['metadata'] = meta
                else:
                    changes.pop('metadata', None)
            old = copy.deepcopy(obj.raw)
            merged = dicts.patch_dict(old, changes)
            if merged == old:
                return aiohttp.web.json_response(old)  # no-op: no event, same resourceVersion
            bump = {'resourceVersion': self._next_rv()}
            if spec_part(merged) != spec_part(old):
                bump['generation'] = int(old.get('metadata', {}).get('generation', 1)) + 1
            obj.patch(dicts.patch_dict(changes, {'metadata': bump}))
            raw = obj.raw
            await self._buses[request.resource].put({'type': 'MODIFIED', 'object': raw})
            return aiohttp.web.json_response(raw)

    async def _replace(self, request):
        key = self._key(request)
        data = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            obj = self._stored(key)
            if obj is None:
                return status_error(404, 'NotFound', f'{request.name} not found')
            stored = obj.raw
            want = data.get('metadata', {}).get('resourceVersion')
            have = stored.get('metadata', {}).get('resourceVersion')
            if want and want != have:
                return status_error(
                    409, 'Conflict',
                    f'Operation cannot be fulfilled on {request.resource.plural} '
                    f'"{request.name}": the object has been modified; please apply your '
                    f'changes to the latest version and try again')
            new = copy.deepcopy(data)
            meta = new.setdefault('metadata', {})
            for k in ('uid', 'creationTimestamp', 'namespace', 'name'):
                if k in stored.get('metadata', {}):
                    meta[k] = stored['metadata'][k]
            if request.resource.plural in STATUS_SUBRESOURCE and request.subresource != 'status':
                new['status'] = stored.get('status')
                if new['status'] is None:
                    new.pop('status')
            if spec_part(new) == spec_part(stored) and new.get('status') == stored.get('status') \
                    and {k: v for k, v in meta.items() if k != 'resourceVersion'} == \
                    {k: v for k, v in stored['metadata'].items() if k != 'resourceVersion'}:
                return aiohttp.web.json_response(stored)
            meta['resourceVersion'] = self._next_rv()
            obj.create(new)
            raw = obj.raw
            await self._buses[request.resource].put({'type': 'MODIFIED', 'object': raw})
            return aiohttp.web.json_response(raw)

    def _matches(self, request, obj) -> bool:
        selector = request.params.get('fieldSelector', '')
        for term in filter(None, selector.split(',')):
            field, _, value = term.partition('=')
            if field == 'metadata.name' and obj.get('metadata', {}).get('name') != value.lstrip('='):
                return False
        return True

    def _objects_for(self, request):
        out = []
        for (resource, namespace, name), obj in self._objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            if self._matches(request, obj.raw):
                out.append(obj.raw)
        return out

    async def _serve_list(self, request):
        r = request.resource
        async with self._lock:
            items = self._objects_for(request)
            rv = str(self._rv)
        kind = KINDS.get((r.group, r.version, r.plural), 'Object')
        return {
            'apiVersion': f'{r.group}/{r.version}' if r.group else r.version,
            'kind': f'{kind}List',
            'metadata': {'resourceVersion': rv},
            'items': items,
        }

    async def _serve_watch(self, request):
        yield b''
        try:
            since = int(request.params.get('resourceVersion') or 0)
        except ValueError:
            since = 0
        async with self._lock:
            replay = [o for o in self._objects_for(request) if rv_of(o) > since]
        for obj in replay:
            yield {'type': 'ADDED', 'object': obj}
        async for event in self._buses[request.resource]:
            obj = event.get('object', {})
            ns = obj.get('metadata', {}).get('namespace')
            if request.namespace is not None and ns != request.namespace:
                continue
            if self._matches(request, obj):
                yield event


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--port', type=int, default=0)
    parser.add_argument('--record', metavar='FILE')
    args = parser.parse_args()
    async with PorticoEmulator() as emulator, kmock.Server(emulator, port=args.port or None) as server:
        if args.record:
            emulator.record_to = open(args.record, 'a', encoding='utf-8')
        print(f'listening on {server.port}', flush=True)
        await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main())
