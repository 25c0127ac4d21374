"""aerate: userspace free-page reporting for KVM guests.

`aerate.agent` (folder agent/) runs inside the guest and needs only the standard library;
`aerate.host` (folder host/) is the host daemon and operator CLI; `aerate.deploy` (folder
deploy/) builds guest images and libvirt domains for the demo and the tests.
"""

__version__ = "0.1.0"
