// The dashboard page: one EventSource on /api/stream; JSON from /api/* when a view needs more.
document.addEventListener('alpine:init', () => {
  Alpine.data('dashboard', () => ({
    view: 'jobs', jobId: null, page: 1, pageSize: 50, total: 0,
    filters: {status: '', workflow: '', language: '', text: '', since: '', until: ''},
    jobs: [], workflows: [], job: null, jobError: '', workers: [], queues: [], connected: false,
    speakers: null, speakersError: '', speakersKey: '',
    session: {actions: false, reason: ''}, actionError: '', charts: null, chartsError: '', hooks: null, hooksError: '',
    _timers: {},

    init() {
      window.addEventListener('hashchange', () => this.route());
      this.route();
      this.loadJobs();
      this.get('/api/workers').then(w => { this.workers = w; });
      this.get('/api/queues').then(q => { this.queues = q; });
      this.get('/api/session').then(s => { this.session = s; });
      setInterval(() => this.refreshView(), 10000);  // charts and webhooks are read, not pushed
      this.connect();
    },
    refreshView() {
      if (this.view === 'charts') this.loadCharts();
      if (this.view === 'webhooks') this.loadHooks();
    },
    async loadCharts() {
      try { this.charts = await this.get('/api/charts'); this.chartsError = ''; }
      catch (e) { this.chartsError = e.message; }
    },
    async loadHooks() {  // a record that cannot be read is an error on the page, never an empty table
      try { this.hooks = await this.get('/api/webhooks'); this.hooksError = ''; }
      catch (e) { this.hooks = null; this.hooksError = e.message; }
    },
    async act(jobId, what) {  // cancel or retry; the server checks the token again (and the header)
      this.actionError = '';
      const response = await fetch(`/api/jobs/${encodeURIComponent(jobId)}/${what}`,
        {method: 'POST', credentials: 'same-origin', headers: {'X-Captionbus-Action': '1'}});
      if (!response.ok) {
        this.actionError = `${what} ${jobId}: ` + ((await response.json().catch(() => ({}))).error?.message || response.statusText);
        return;
      }
      this.later('jobs', () => this.loadJobs());
      if (this.view === 'job' && jobId === this.jobId) this.later('job', () => this.loadJob());
    },
    canCancel(j) { return ['pending', 'running'].includes(j.status); },
    canRetry(j) { return ['failed', 'cancelled'].includes(j.status); },
    async get(url) {
      const response = await fetch(url, {credentials: 'same-origin'});
      if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error?.message || response.statusText);
      return response.json();
    },
    route() {
      const [, view, id] = (location.hash || '#/jobs').split('/');
      this.view = view || 'jobs';
      if (this.view === 'job') { this.jobId = id; this.job = null; this.loadJob(); }
      this.refreshView();
    },
    connect() {
      const source = new EventSource('/api/stream');
      source.onopen = () => { this.connected = true; };
      source.onerror = () => { this.connected = false; };  // EventSource reconnects by itself
      // sent first on every (re)connected stream: read the lists again (what changed while the
      // page was not subscribed, e.g. before the dashboard reached the bus)
      source.addEventListener('sync', () => { this.later('jobs', () => this.loadJobs()); if (this.view === 'job') this.later('job', () => this.loadJob()); });
      source.addEventListener('job', e => this.onJob(JSON.parse(e.data)));
      source.addEventListener('event', e => this.onEvent(JSON.parse(e.data)));
      source.addEventListener('workers', e => { this.workers = JSON.parse(e.data); });
      source.addEventListener('queues', e => { this.queues = JSON.parse(e.data); });
    },
    later(name, fn, ms = 150) {  // coalesce bursts of updates into one request
      clearTimeout(this._timers[name]);
      this._timers[name] = setTimeout(fn, ms);
    },
    onJob(summary) {
      const i = this.jobs.findIndex(j => j.job_id === summary.job_id);
      const filtered = Object.values(this.filters).some(v => v);
      if (i >= 0 && !filtered) this.jobs[i] = summary;
      else if (i >= 0 || this.page === 1) this.later('jobs', () => this.loadJobs());
      if (this.view === 'job' && summary.job_id === this.jobId) this.later('job', () => this.loadJob());
    },
    onEvent(event) {
      if (event.kind === 'stage_progress') {
        const row = this.jobs.find(j => j.job_id === event.job_id);
        const node = row && row.nodes.find(n => n.node === event.node);
        if (node) { node.progress = event.fraction; node.message = event.message || ''; }
      }
      if (this.view === 'job' && event.job_id === this.jobId) this.later('job', () => this.loadJob(), 300);
    },
    async loadJobs() {
      const params = new URLSearchParams({page: this.page});
      for (const [key, value] of Object.entries(this.filters)) {
        if (!value) continue;
        params.set(key, (key === 'since' || key === 'until') ? new Date(value).toISOString() : value);
      }
      const data = await this.get('/api/jobs?' + params);
      Object.assign(this, {jobs: data.jobs, total: data.total, pageSize: data.page_size, workflows: data.workflows});
    },
    async loadJob() {
      if (!this.jobId) return;
      try { this.job = await this.get('/api/jobs/' + encodeURIComponent(this.jobId)); this.jobError = ''; }
      catch (e) { this.job = null; this.jobError = e.message; }
      this.loadSpeakers();
    },
    async loadSpeakers() {  // once per job page and diarization attempt: the turns on the node's record
      const node = this.job && this.job.speakers_node, row = node && this.job.nodes.find(n => n.node === node);
      const key = node && `${this.jobId}/${node}/${row ? row.attempt : ''}`;
      if (!node) { this.speakers = null; this.speakersError = ''; this.speakersKey = ''; return; }
      if (this.speakersKey === key) return;
      this.speakersKey = key;
      try { this.speakers = await this.get(`/api/jobs/${encodeURIComponent(this.jobId)}/speakers`); this.speakersError = ''; }
      catch (e) { this.speakers = null; this.speakersError = e.message; }
    },
    turn(t) {  // a speaker turn on the film's time axis (seconds of the film, not of the job)
      const d = Math.max(this.speakers.duration, 1e-3);
      return `left:${(100 * t.start / d).toFixed(3)}%;width:${Math.max(0.15, 100 * (t.end - t.start) / d).toFixed(3)}%`;
    },
    speakerColor(label) {
      const s = this.speakers.speakers.find(x => x.label === label);
      return `hsl(${((s ? s.color : 0) * 137) % 360} 60% 55%)`;
    },
    problems() { return this.queues.filter(q => q.problem); },
    languages(j) {
      return (j.source_language || 'auto') + (j.target_languages.length ? ' → ' + j.target_languages.join(', ') : '');
    },
    when(iso) { return iso ? new Date(iso).toLocaleString() : ''; },
    seconds(s) {  // "0.42 s", "12.3 s", "4.1 min"
      if (s == null) return '';
      return s < 10 ? `${s.toFixed(2)} s` : s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
    },
    duration(j) { return j.duration_s != null ? this.seconds(j.duration_s) : ''; },
    pct(value, max) { return max ? Math.max(value ? 1 : 0, Math.round(100 * (value || 0) / max)) : 0; },
    perMinuteMax() { const m = this.charts.jobs_per_minute; return Math.max(1, ...m.submitted, ...m.finished); },
    stageMax(kind) { return Math.max(0, ...this.charts.stages.map(s => s[kind].p95 || 0)); },
    minuteLabel(i) { return new Date(1000 * (this.charts.since + i * this.charts.bucket_s)).toLocaleTimeString(); },
    age(iso) {  // "12 s", "3 min", "2 h" since an ISO time
      const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
      return s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
    },
    size(bytes) {
      if (bytes == null) return '';
      const units = ['B', 'KB', 'MB', 'GB'];
      let i = 0;
      while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
      return bytes.toFixed(i ? 1 : 0) + ' ' + units[i];
    },
    packages(worker) {
      return Object.entries(worker).filter(([k]) => k.startsWith('pkg.')).map(([k, v]) => k.slice(4) + ' ' + v).join(', ');
    },
    span() {  // the job's whole span on the timeline: attempts and job events (cancel, retry, end)
      const times = [...this.job.timeline.flatMap(t => [t.start, t.end]), ...this.job.marks.map(m => m.time)]
        .filter(Boolean).map(t => Date.parse(t));
      const t0 = Math.min(...times), t1 = Math.max(...times, Date.now() * (this.job.status === 'running'));
      return [t0, Math.max(t1 - t0, 1)];
    },
    bar(a) {  // a Gantt bar, as a share of the job's whole span
      const [t0, span] = this.span(), start = Date.parse(a.start), end = a.end ? Date.parse(a.end) : t0 + span;
      return `left:${(100 * (start - t0) / span).toFixed(2)}%;width:${Math.max(0.5, 100 * (end - start) / span).toFixed(2)}%`;
    },
    mark(m) {  // a job event (cancel, retry, end) as a line on the timeline
      const [t0, span] = this.span();
      return `left:${(100 * (Date.parse(m.time) - t0) / span).toFixed(2)}%`;
    },
  }));
});
