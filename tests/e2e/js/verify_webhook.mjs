// Receiver-side check of a Fictures AI webhook with the standardwebhooks npm package.
// Reads {"secret": "whsec_...", "headers": {...}, "body": "<the raw body>"} on stdin; prints
// the verified payload as JSON and exits 0, or prints why and exits 1.
import { Webhook } from "standardwebhooks";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { secret, headers, body } = JSON.parse(input);

try {
  // The code of docs/webhooks.md: verify the raw body, before parsing it.
  const payload = new Webhook(secret).verify(body, headers);
  console.log(JSON.stringify(payload));
} catch (error) {
  console.error(`verification failed: ${error.message}`);
  process.exit(1);
}
