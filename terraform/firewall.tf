# One cloud firewall for the cluster, applied by tag: every droplet carrying the cluster tag is
# covered from the moment it exists (the droplets depend on this firewall, so it is created
# first), a replaced droplet included. DigitalOcean firewalls are stateful: replies to allowed
# connections need no rule of their own.

locals {
  anywhere = ["0.0.0.0/0", "::/0"]
  # The service behind the reserved IP: 80, 443 and the port the web service listens on.
  service_ports = sort(distinct([for port in [80, 443, var.web_port] : tostring(port)]))
}

resource "digitalocean_firewall" "cluster" {
  name = "${var.name_prefix}-cluster"
  tags = [digitalocean_tag.cluster.name]

  # Election traffic only between members. A tag covers both the private addresses (eligible
  # pair, same region VPC) and the public ones (the witness is in another region, and VPCs are
  # regional, so it reaches the others over public addresses).
  inbound_rule {
    protocol    = "udp"
    port_range  = tostring(var.election_port)
    source_tags = [digitalocean_tag.cluster.name]
  }

  dynamic "inbound_rule" {
    for_each = local.service_ports
    content {
      protocol         = "tcp"
      port_range       = inbound_rule.value
      source_addresses = local.anywhere
    }
  }

  # Administration only from the operator's network.
  inbound_rule {
    protocol         = "tcp"
    port_range       = "22"
    source_addresses = [var.admin_cidr]
  }

  # ICMP between members and from the operator: ping and path-MTU discovery for diagnosis.
  inbound_rule {
    protocol         = "icmp"
    source_tags      = [digitalocean_tag.cluster.name]
    source_addresses = [var.admin_cidr]
  }

  outbound_rule {
    protocol         = "udp"
    port_range       = tostring(var.election_port)
    destination_tags = [digitalocean_tag.cluster.name]
  }

  # DNS.
  outbound_rule {
    protocol              = "udp"
    port_range            = "53"
    destination_addresses = local.anywhere
  }

  outbound_rule {
    protocol              = "tcp"
    port_range            = "53"
    destination_addresses = local.anywhere
  }

  # HTTPS: the DigitalOcean API and container registries.
  outbound_rule {
    protocol              = "tcp"
    port_range            = "443"
    destination_addresses = local.anywhere
  }

  # HTTP: the distribution's package mirrors (cloud-init installs Docker; apt verifies
  # packages by signature, not by transport).
  outbound_rule {
    protocol              = "tcp"
    port_range            = "80"
    destination_addresses = local.anywhere
  }

  # NTP: the leases assume clocks whose rates are sane; keep timesyncd working.
  outbound_rule {
    protocol              = "udp"
    port_range            = "123"
    destination_addresses = local.anywhere
  }

  outbound_rule {
    protocol              = "icmp"
    destination_addresses = local.anywhere
  }
}
