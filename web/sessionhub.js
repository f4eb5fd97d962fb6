// sessionhub browser client: placeholder, replaced by the real client.
export class SessionHub {}
