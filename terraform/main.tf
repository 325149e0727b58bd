# Three droplets: node 1 and node 2 (eligible, in the primary region, where the reserved IP
# lives) and node 3, the witness, in another region (it votes but never leads, so losing the
# primary region's network to one droplet still leaves a majority). Node ids are these fixed
# config values, never droplet ids: recreating a droplet must not change who may lead.

locals {
  cluster_tag = "${var.name_prefix}-cluster"
  members = {
    "1" = { eligible = true }
    "2" = { eligible = true }
    "3" = { eligible = false }
  }
  # nonsensitive(): whether the token is empty is not a secret, and without it this local, and
  # so the token_placement output, would be sensitive ("Output refers to sensitive values").
  sidecar_token_in_user_data = var.template_sidecar_token && nonsensitive(var.sidecar_do_token != "")
  token_precondition_message = "sidecar_do_token is empty: set it, or set template_sidecar_token = false and place /etc/fip-sidecar/do_token on each droplet yourself."
  configure_script           = file("${path.module}/files/configure_sidecar.py")
  # The guest agent (fip-guest agent, from the sidecar image) runs on the eligible droplets
  # when a guest step is enabled; its command line, as the systemd unit runs it.
  run_guest_agent = var.enable_ipv6 || var.enable_anchor_route
  guest_agent_args = join(" ", concat(
    ["agent", "--status-url", "http://127.0.0.1:${var.status_port}"],
    ["--interval", tostring(var.guest_agent_interval), "--ipv6-device", var.guest_ipv6_device],
    var.enable_anchor_route ? [] : ["--no-ipv4-route"],
  ))

  # Everything a node needs to write its own config, except the peers' addresses, which
  # configure_sidecar.py looks up by tag at boot (templating them here would make a cycle).
  cluster_settings = {
    cluster_tag   = local.cluster_tag
    members       = local.members
    election_port = var.election_port
    status_listen = "127.0.0.1:${var.status_port}"
    profile       = var.timing_profile
    reserved_ip   = digitalocean_reserved_ip.service.ip_address
    reserved_ipv6 = var.enable_ipv6 ? digitalocean_reserved_ipv6.service[0].ip : ""
    api_url       = "https://api.digitalocean.com"
    token_file    = "/etc/fip-sidecar/do_token"
    config_file   = "/etc/fip-sidecar/config.toml"
  }
}

resource "digitalocean_tag" "cluster" {
  name = local.cluster_tag
}

resource "digitalocean_tag" "node" {
  for_each = local.members
  name     = "${local.cluster_tag}-node-${each.key}"
}

# The reserved IP is created with a region only. Setting droplet_id here, or adding a
# digitalocean_reserved_ip_assignment resource, would make Terraform the owner of the
# assignment: after every failover the next `terraform apply` would move the IP back to the
# droplet named in the configuration. The sidecars own the assignment; the leader assigns it.
resource "digitalocean_reserved_ip" "service" {
  region = var.primary_region

  lifecycle {
    # The address is what clients and DNS point at; losing it is an outage that outlives
    # the stack. Remove this line deliberately (and first) to destroy it.
    prevent_destroy = true
  }
}

# The reserved IPv6 (enable_ipv6), like the IPv4: a region only, never an assignment
# (digitalocean_reserved_ipv6_assignment would move it back after every failover).
resource "digitalocean_reserved_ipv6" "service" {
  count       = var.enable_ipv6 ? 1 : 0
  region_slug = var.primary_region

  lifecycle {
    prevent_destroy = true # as for the IPv4: clients and DNS point at it
  }
}

# Optional: a VPC of the eligible pair's own (vpc_ip_range); otherwise the region's default VPC.
resource "digitalocean_vpc" "cluster" {
  count    = var.vpc_ip_range == "" ? 0 : 1
  name     = "${var.name_prefix}-${var.primary_region}"
  region   = var.primary_region
  ip_range = var.vpc_ip_range
}

resource "digitalocean_droplet" "eligible" {
  #checkov:skip=CKV_DIO_2:ssh_keys is var.ssh_key_fingerprints, a required variable validated non-empty; checkov cannot resolve it
  count = 2

  name       = "${var.name_prefix}-node-${count.index + 1}"
  region     = var.primary_region
  size       = var.droplet_size
  image      = var.droplet_image
  ssh_keys   = var.ssh_key_fingerprints
  monitoring = true
  ipv6       = true
  vpc_uuid   = one(digitalocean_vpc.cluster[*].id)
  tags = [
    digitalocean_tag.cluster.name,
    digitalocean_tag.node[tostring(count.index + 1)].name,
  ]

  # The firewall applies by tag, so it must exist before a droplet carrying the tag boots:
  # a droplet (also a replacement) is never reachable unprotected.
  depends_on = [digitalocean_firewall.cluster]

  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    cluster_json       = jsonencode(merge(local.cluster_settings, { node_id = count.index + 1, health_url = "http://127.0.0.1:${var.web_port}${var.health_path}" }))
    cluster_key        = trimspace(var.cluster_key)
    token_in_user_data = local.sidecar_token_in_user_data
    sidecar_do_token   = local.sidecar_token_in_user_data ? trimspace(var.sidecar_do_token) : ""
    sidecar_image      = var.sidecar_image
    run_web            = true
    web_image          = var.web_image
    configure_script   = local.configure_script
    run_guest_agent    = local.run_guest_agent
    guest_agent_args   = local.guest_agent_args
  })

  lifecycle {
    # A change of image, ssh_keys, user_data or vpc_uuid replaces a droplet, and one of size
    # powers it off to resize it: applied to all droplets at once, that is an outage.
    # Terraform ignores them, so one apply never takes down more than one droplet; README
    # "Rolling changes" rolls them out one droplet at a time with `terraform apply -replace`,
    # and check "rollout" below lists the droplets left to roll.
    ignore_changes = [image, size, ssh_keys, user_data, vpc_uuid]

    precondition {
      condition     = !var.template_sidecar_token || nonsensitive(var.sidecar_do_token != "")
      error_message = local.token_precondition_message
    }

    precondition {
      condition     = var.web_port != var.status_port
      error_message = "web_port and status_port must differ: the web service and the sidecar's status server both listen on the droplet's host network."
    }
  }
}

resource "digitalocean_droplet" "witness" {
  #checkov:skip=CKV_DIO_2:ssh_keys is var.ssh_key_fingerprints, a required variable validated non-empty; checkov cannot resolve it
  name       = "${var.name_prefix}-witness-3"
  region     = var.witness_region
  size       = var.droplet_size
  image      = var.droplet_image
  ssh_keys   = var.ssh_key_fingerprints
  monitoring = true
  ipv6       = true
  tags = [
    digitalocean_tag.cluster.name,
    digitalocean_tag.node["3"].name,
  ]

  depends_on = [digitalocean_firewall.cluster]

  # The witness runs no web service and needs no health check (it never leads); it still
  # needs the token, with droplet:read and tag:read, to look up the other members' addresses.
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    cluster_json       = jsonencode(merge(local.cluster_settings, { node_id = 3, health_url = "" }))
    cluster_key        = trimspace(var.cluster_key)
    token_in_user_data = local.sidecar_token_in_user_data
    sidecar_do_token   = local.sidecar_token_in_user_data ? trimspace(var.sidecar_do_token) : ""
    sidecar_image      = var.sidecar_image
    run_web            = false
    web_image          = var.web_image
    configure_script   = local.configure_script
    run_guest_agent    = false # the witness never holds an address
    guest_agent_args   = ""
  })

  lifecycle {
    ignore_changes = [image, size, ssh_keys, user_data, vpc_uuid] # as for the eligible pair

    precondition {
      condition     = !var.template_sidecar_token || nonsensitive(var.sidecar_do_token != "")
      error_message = local.token_precondition_message
    }

    precondition {
      condition     = var.witness_region != var.primary_region
      error_message = "witness_region must differ from primary_region: a witness in the same region fails together with the eligible pair."
    }
  }
}

# What an apply left for the rolling procedure: droplets still on an old image, size or key set.
# A check block warns (it never fails a plan), naming the command for each droplet.
check "rollout" {
  assert {
    condition = length(local.droplets_to_roll) == 0
    error_message = join("\n", concat(
      ["Droplets differ from droplet_image/droplet_size/ssh_key_fingerprints; roll them one at a time (README, Rolling changes):"],
      [for address in local.droplets_to_roll : "  terraform apply -replace='${address}'"],
    ))
  }
}

locals {
  droplets_by_address = merge(
    { for index, droplet in digitalocean_droplet.eligible : "digitalocean_droplet.eligible[${index}]" => droplet },
    { "digitalocean_droplet.witness" = digitalocean_droplet.witness },
  )
  droplets_to_roll = sort([
    for address, droplet in local.droplets_by_address : address
    if droplet.image != var.droplet_image || droplet.size != var.droplet_size || toset(droplet.ssh_keys) != toset(var.ssh_key_fingerprints)
  ])
}

# The project DigitalOcean's control panel groups the deployment under.
resource "digitalocean_project" "cluster" {
  name        = var.project_name == "" ? var.name_prefix : var.project_name
  description = "fip-sidecar: two eligible droplets and a witness sharing a reserved IP"
  purpose     = "Web Application"
  environment = var.project_environment
  resources = concat(
    digitalocean_droplet.eligible[*].urn,
    [digitalocean_droplet.witness.urn, digitalocean_reserved_ip.service.urn],
    digitalocean_reserved_ipv6.service[*].urn,
  )
}
