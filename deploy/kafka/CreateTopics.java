// Creates topics through the Kafka Admin API, idempotently, waiting for the broker to answer.
// Run as a single-file program on the broker's class path (no build step):
//   java -cp 'LIBS/*' deploy/kafka/CreateTopics.java BOOTSTRAP PARTITIONS TOPIC...
import java.util.*;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.common.errors.TopicExistsException;

public class CreateTopics {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        int partitions = Integer.parseInt(args[1]);
        List<String> names = Arrays.asList(args).subList(2, args.length);
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "60000");
        try (Admin admin = Admin.create(props)) {
            // The broker answers once its metadata is loaded: describe the cluster first.
            String cluster = admin.describeCluster().clusterId().get();
            Set<String> existing = admin.listTopics().names().get();
            List<NewTopic> missing = new ArrayList<>();
            for (String n : names) if (!existing.contains(n)) missing.add(new NewTopic(n, partitions, (short) 1));
            for (Map.Entry<String, ? extends org.apache.kafka.common.KafkaFuture<Void>> e : admin.createTopics(missing).values().entrySet()) {
                try {
                    e.getValue().get();
                } catch (ExecutionException ex) {
                    if (!(ex.getCause() instanceof TopicExistsException)) throw ex;
                }
            }
            System.out.println("[stack] kafka cluster " + cluster + ": topics " + String.join(" ", names)
                + " (" + missing.size() + " created, " + partitions + " partitions each)");
        }
    }
}
