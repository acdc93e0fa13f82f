"""Instance providers: they create and destroy compute instances for the OSS pools.

It owns the libvirt provider, split into the pure `domain.py` (URI
classification, names, MACs, lab addresses, the kernel command line and config
disk, the domain/pool/volume XML, `LibvirtConfig` and the provider errors) and
the adapter `libvirt.py` (`LibvirtProvider`: every libvirt call on a worker thread
under a timeout), plus `libvirtd.py` (`PrivateLibvirtd`: a lab's own libvirt
daemons).  Providers implement the `Provider` protocol of `oss.compute.pool`
structurally.
"""
