# DigitalOcean's uptime check probes the service on the reserved IP from outside, so it sees
# what clients see: a failover that leaves the IP on a dead or unassigned droplet, not just a
# dead droplet. Only the check and its alert are Terraform's; the IP's assignment stays the
# sidecars' (see main.tf).

locals {
  uptime_scheme = var.web_port == 443 ? "https" : "http"
  uptime_port   = contains([80, 443], var.web_port) ? "" : ":${var.web_port}"
}

resource "digitalocean_uptime_check" "service" {
  name    = "${var.name_prefix}-reserved-ip"
  type    = local.uptime_scheme
  target  = "${local.uptime_scheme}://${digitalocean_reserved_ip.service.ip_address}${local.uptime_port}${var.health_path}"
  regions = var.uptime_check_regions
  enabled = true
}

resource "digitalocean_uptime_alert" "service_down" {
  name     = "${var.name_prefix}-reserved-ip-down"
  check_id = digitalocean_uptime_check.service.id
  type     = "down"
  period   = "2m"

  notifications {
    email = var.alert_emails

    dynamic "slack" {
      for_each = var.alert_slack_channel == "" ? [] : [var.alert_slack_channel]
      content {
        channel = slack.value
        url     = var.alert_slack_webhook_url
      }
    }
  }

  lifecycle {
    precondition {
      condition     = length(var.alert_emails) > 0 || var.alert_slack_channel != ""
      error_message = "The uptime alert needs somewhere to go: set alert_emails, or alert_slack_channel with alert_slack_webhook_url."
    }

    precondition {
      condition     = var.alert_slack_channel == "" || nonsensitive(var.alert_slack_webhook_url != "")
      error_message = "alert_slack_channel is set but alert_slack_webhook_url is empty."
    }
  }
}
