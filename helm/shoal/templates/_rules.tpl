{{/*
The alert rules (PrometheusRule's spec, also a plain Prometheus rules file). Every series they
use is exported from start at 0 (README, Operations), so "no data" never hides a problem.
*/}}
{{- define "shoal.ruleGroups" -}}
{{- $r := .Values.metrics.prometheusRule -}}
groups:
  - name: shoal
    rules:
      - alert: ShoalSwarmFallbackRatioHigh
        # swarm downloads abandoned for the registry, as a share of all downloads; 0 while the
        # origin and the tracker are healthy
        expr: |-
          sum(rate(shoal_agent_fallbacks_total[10m]))
            / sum(rate(shoal_agent_downloads_total[10m])) > {{ $r.fallbackRatio }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: More than {{ mulf $r.fallbackRatio 100 }}% of blob downloads fell back to the registry
          description: 'Fallbacks by reason: sum by (reason) (rate(shoal_agent_fallbacks_total[10m])). The registry carries the load the swarm should.'
      - alert: ShoalIntegrityFailure
        # bytes that did not hash to their digest: a corrupt disk, a broken peer or registry
        expr: sum by (namespace, pod, node, source) (increase(shoal_agent_integrity_failures_total[15m])) > 0
        labels:
          severity: critical
        annotations:
          summary: 'Agent {{ "{{ $labels.pod }}" }} on {{ "{{ $labels.node }}" }} received a blob that failed its digest check (source {{ "{{ $labels.source }}" }})'
          description: The blob was refused and fetched again; repeated failures point at a bad peer, disk or registry.
      - alert: ShoalCorruptCacheBlobs
        # the scrub found cached blobs that no longer hash to their digest (silent disk corruption)
        expr: sum by (namespace, pod, node) (increase(shoal_agent_cache_corrupt_blobs_total[1h])) > 0
        labels:
          severity: warning
        annotations:
          summary: 'Agent {{ "{{ $labels.pod }}" }} found corrupt blobs in its cache'
          description: They were dropped; check the node's disk.
      - alert: ShoalJournalShippingStalled
        # pull records the agent could not ship to the origin's collector
        expr: max by (namespace, pod, node) (shoal_agent_journal_unshipped_bytes) > {{ int64 $r.journalUnshippedBytes }}
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: 'Agent {{ "{{ $labels.pod }}" }} holds {{ "{{ $value | humanize1024 }}" }}B of unshipped journal'
          description: The origin's journal collector is unreachable or refusing batches; past journal.max_disk_bytes the agent answers 503.
      - alert: ShoalJournalShippingFailing
        expr: |-
          sum by (namespace, pod, node) (increase(shoal_agent_journal_ship_failures_total[15m])) > 0
            and sum by (namespace, pod, node) (increase(shoal_agent_journal_shipped_records_total[15m])) == 0
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: 'Agent {{ "{{ $labels.pod }}" }} has shipped no journal records for 15 minutes, only failures'
      - alert: ShoalSwarmCredentialExpiring
        # grants are renewed at half-life: one this close to expiry was not renewed
        expr: |-
          shoal_agent_swarm_token_expiry_timestamp_seconds > 0
            and shoal_agent_swarm_token_expiry_timestamp_seconds - time() < {{ int64 $r.credentialExpirySeconds }}
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: 'Swarm grants of agent {{ "{{ $labels.pod }}" }} expire in less than {{ int64 $r.credentialExpirySeconds }}s'
          description: The origin did not renew them (unreachable, or the node is banned); at expiry the node leaves every swarm and pulls from the registry.
      - alert: ShoalCacheFull
        # blobs being served and downloads in progress cannot be evicted: past the budget, new
        # downloads cannot be cached
        expr: |-
          (shoal_agent_cache_in_use_bytes + shoal_agent_cache_reserved_bytes)
            / shoal_agent_cache_budget_bytes > 0.9
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: 'The cache of agent {{ "{{ $labels.pod }}" }} is nearly all in use or reserved'
          description: Raise agent.cacheMaxBytes (and the volume) or look for stuck downloads.
      - alert: ShoalCacheOverBudget
        expr: shoal_agent_cache_bytes > shoal_agent_cache_budget_bytes
        for: 30m
        labels:
          severity: warning
        annotations:
          summary: 'The cache of agent {{ "{{ $labels.pod }}" }} has been over its budget for 30 minutes'
      - alert: ShoalSwarmWithoutSeeders
        expr: max_over_time(shoal_tracker_torrents_without_seeders[10m]) > 0
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: Blobs whose swarm lost every seeder (the origin is down or dropped them)
{{- end -}}
