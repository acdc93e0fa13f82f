"""Instance providers: they create and destroy compute instances for the OSS pools.

`oss.compute.providers.libvirt.LibvirtProvider` boots real VMs through libvirt, asking
for what the pure `oss.compute.providers.domain` decides (URIs, names, addresses, the
domain and volume XML, the config disk, the provider's configuration and errors);
`oss.compute.providers.libvirtd.PrivateLibvirtd` runs a lab's own libvirt daemons.
Both implement the `Provider` protocol of `oss.compute.pool` structurally.
"""
