variable "do_token" {
  description = "DigitalOcean API token Terraform uses to create the resources (needs write access to droplets, firewalls, tags and reserved IPs). Never written to a droplet."
  type        = string
  sensitive   = true
}

variable "sidecar_do_token" {
  description = <<-EOT
    Token the sidecars use at run time. Create a separate custom-scoped token with only
    `reserved_ip:read`, `reserved_ip:update` (the assign action), `droplet:read` and `tag:read` (peer
    discovery by tag; the control panel adds the read scopes reserved_ip:update requires: actions,
    regions, sizes, image), so a leaked droplet can move this IP and read droplets, nothing
    more. Leave it empty with template_sidecar_token = false to place it by hand.
  EOT
  type        = string
  sensitive   = true
  default     = ""
}

variable "template_sidecar_token" {
  description = <<-EOT
    Write sidecar_do_token into the droplets' user_data (true), or leave it out so an operator
    places /etc/fip-sidecar/do_token (mode 0600, owner 10001) on each droplet afterwards
    (false). user_data is readable by anything on the droplet through the metadata service
    (169.254.169.254, no authentication), is stored in the Terraform state, and cannot be
    changed without recreating the droplet; false avoids all three at the cost of a manual step.
  EOT
  type        = bool
  default     = true
}

variable "cluster_key" {
  description = "Shared cluster key authenticating election packets (base64, >= 32 bytes; make one with `fip-sidecar keygen`)."
  type        = string
  sensitive   = true

  validation {
    # A pattern, not base64decode(): that function fails on bytes that are not UTF-8, as
    # random key bytes almost never are. 43 base64 characters carry 32 bytes.
    condition     = can(regex("^[A-Za-z0-9+/_-]{43,}={0,2}$", trimspace(var.cluster_key)))
    error_message = "cluster_key must be base64 of at least 32 bytes: generate one with `fip-sidecar keygen`."
  }
}

variable "name_prefix" {
  description = "Prefix for droplet names, tags and the firewall."
  type        = string
  default     = "fip"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}$", var.name_prefix))
    error_message = "name_prefix: lower-case letters, digits and dashes, starting with a letter, at most 31 characters."
  }
}

variable "primary_region" {
  description = "Region of the two eligible droplets and of the reserved IP (DigitalOcean assigns a reserved IP only to droplets in its own region)."
  type        = string
  default     = "nyc3"
}

variable "witness_region" {
  description = "Region of the witness (votes, never leads). Must differ from primary_region, so that losing one region does not lose the majority."
  type        = string
  default     = "tor1"
}

variable "droplet_size" {
  description = "Droplet size slug for all three droplets. Changing it later changes no droplet by itself: roll it out one droplet at a time (README, Rolling changes)."
  type        = string
  default     = "s-1vcpu-1gb"
}

variable "droplet_image" {
  description = "Droplet image slug (cloud-init installs Docker from the distribution's packages; tested against Ubuntu LTS). Rolled out like droplet_size."
  type        = string
  default     = "ubuntu-24-04-x64"
}

variable "ssh_key_fingerprints" {
  description = "Fingerprints (or ids) of SSH keys already in the DigitalOcean account, installed for root on every droplet (at creation: rolled out like droplet_size)."
  type        = list(string)

  validation {
    condition     = length(var.ssh_key_fingerprints) > 0
    error_message = "ssh_key_fingerprints: give at least one key; password logins are not set up."
  }
}

variable "admin_cidr" {
  description = "The only network allowed to reach SSH (port 22), e.g. your office's address as 203.0.113.7/32."
  type        = string

  validation {
    condition     = can(cidrhost(var.admin_cidr, 0)) && !contains(["0.0.0.0/0", "::/0"], var.admin_cidr)
    error_message = "admin_cidr must be a CIDR block narrower than the whole Internet."
  }
}

variable "sidecar_image" {
  description = "Container image reference of fip-sidecar to run (pin a version or digest, e.g. registry.example.com/fip-sidecar:0.1.0)."
  type        = string
}

variable "web_image" {
  description = "Container image of the web service the reserved IP fronts. It runs with host networking and must listen on web_port."
  type        = string
  default     = "nginxdemos/hello:plain-text"
}

variable "web_port" {
  description = "Port the web service listens on; the firewall opens it, 80 and 443 to the world, and the uptime check probes it on the reserved IP (https when 443)."
  type        = number
  default     = 80

  validation {
    condition     = var.web_port == floor(var.web_port) && var.web_port >= 1 && var.web_port <= 65535
    error_message = "web_port must be a TCP port number, 1 to 65535."
  }
}

variable "health_path" {
  description = "Path of the web service's health URL, probed by the sidecar on 127.0.0.1:web_port."
  type        = string
  default     = "/"
}

variable "election_port" {
  description = "UDP port of election traffic; the firewall opens it only between the three droplets."
  type        = number
  default     = 7401
}

variable "status_port" {
  description = "Port of the sidecar's /healthz, /status and /metrics; bound to 127.0.0.1 only."
  type        = number
  default     = 9401
}

variable "timing_profile" {
  description = "Sidecar timing profile: \"lan\" (~0.7 s failover) or \"wan\" (~3.5 s, tolerates a distant, lossy witness link)."
  type        = string
  default     = "lan"

  validation {
    condition     = contains(["lan", "wan"], var.timing_profile)
    error_message = "timing_profile must be \"lan\" or \"wan\"."
  }
}

variable "vpc_ip_range" {
  description = "Leave empty to put the eligible droplets in the primary region's default VPC, or give a range (RFC 1918, /16 to /28, e.g. 10.118.0.0/20) for a VPC of their own. The witness, in another region, stays in that region's default VPC (VPCs are regional). Rolled out like droplet_size."
  type        = string
  default     = ""

  validation {
    condition     = var.vpc_ip_range == "" || (can(cidrhost(var.vpc_ip_range, 0)) && try(tonumber(split("/", var.vpc_ip_range)[1]) >= 16 && tonumber(split("/", var.vpc_ip_range)[1]) <= 28, false))
    error_message = "vpc_ip_range must be empty or a CIDR block from /16 to /28."
  }
}

variable "project_name" {
  description = "Name of the DigitalOcean project holding the droplets and the reserved IP (empty: name_prefix)."
  type        = string
  default     = ""
}

variable "project_environment" {
  description = "Environment of the DigitalOcean project: \"Development\", \"Staging\" or \"Production\"."
  type        = string
  default     = "Production"

  validation {
    condition     = contains(["development", "staging", "production"], lower(var.project_environment))
    error_message = "project_environment must be Development, Staging or Production."
  }
}

variable "uptime_check_regions" {
  description = "Where DigitalOcean's uptime check probes the reserved IP from (us_east, us_west, eu_west, se_asia)."
  type        = list(string)
  default     = ["us_east", "eu_west"]

  validation {
    condition     = length(var.uptime_check_regions) > 0 && alltrue([for region in var.uptime_check_regions : contains(["us_east", "us_west", "eu_west", "se_asia"], region)])
    error_message = "uptime_check_regions: one or more of us_east, us_west, eu_west, se_asia."
  }
}

variable "alert_emails" {
  description = "Addresses (of members of the DigitalOcean team) the uptime alert mails when the service on the reserved IP is down. Give these, a Slack channel, or both."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for address in var.alert_emails : can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", address))])
    error_message = "alert_emails: every entry must be an e-mail address."
  }
}

variable "alert_slack_channel" {
  description = "Slack channel (e.g. #ops) the uptime alert posts to, through alert_slack_webhook_url; empty for none."
  type        = string
  default     = ""
}

variable "alert_slack_webhook_url" {
  description = "Slack incoming-webhook URL for alert_slack_channel."
  type        = string
  sensitive   = true
  default     = ""
}

variable "enable_ipv6" {
  description = <<-EOT
    Also create a reserved IPv6 in primary_region (never assigned by Terraform: the sidecars
    move it with the reserved IPv4), list both in the sidecars' config, and run the guest
    agent (fip-guest.service, CAP_NET_ADMIN only) on the eligible droplets: it puts the
    reserved IPv6 on the holder as a /128 and makes it the source of outbound IPv6. The
    droplets always have IPv6 enabled. The sidecar token needs no new scope (reserved_ip:read
    and reserved_ip:update cover IPv6; actions:read comes with reserved_ip:update). Changes
    user_data: roll existing droplets (README, Rolling changes).
  EOT
  type        = bool
  default     = false
}

variable "enable_anchor_route" {
  description = <<-EOT
    Run the guest agent's IPv4 step on the eligible droplets: the holder of the reserved IPv4
    routes outbound IPv4 through its anchor gateway, so connections the service opens leave
    from the reserved IPv4, and every other droplet through its public gateway. Inbound traffic
    needs no such step. Changes user_data like enable_ipv6.
  EOT
  type        = bool
  default     = false
}

variable "guest_agent_interval" {
  description = "Seconds between the guest agent's reads of the sidecar's /status (with enable_ipv6 or enable_anchor_route)."
  type        = number
  default     = 1

  validation {
    condition     = var.guest_agent_interval >= 0.2 && var.guest_agent_interval <= 60
    error_message = "guest_agent_interval must be between 0.2 and 60 seconds."
  }
}

variable "guest_ipv6_device" {
  description = "Network device the holder puts the reserved IPv6 on as a /128 (with enable_ipv6)."
  type        = string
  default     = "lo"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]{1,15}$", var.guest_ipv6_device))
    error_message = "guest_ipv6_device must be a network device name: 1 to 15 letters, digits, '.', '_' or '-'."
  }
}
